"""Local HTTP servers for the unit tests' fakes: loopback, a free port, served from a thread."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers with :meth:`reply`."""

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: object = b"", content_type: str = "application/json") -> None:
        """Answer ``status`` with ``body``: bytes as they are, anything else as JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class LocalServer:
    """Serve ``handler`` on 127.0.0.1 until :meth:`close`; ``url`` is its base URL."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], poll_interval: float = 0.05):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(poll_interval,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeGateway:
    """A Pushgateway that records every push ``(method, path, body, Authorization)``, answers
    ``status``, and serves ``exposition`` on GET."""

    def __init__(self):
        self.pushes: list[tuple[str, str, str, str | None]] = []
        self.exposition = ""
        self.status = 200
        fake = self

        class Handler(QuietHandler):
            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                fake.pushes.append((self.command, self.path, body, self.headers.get("Authorization")))
                self.reply(fake.status)

            do_PUT = do_POST = do_DELETE = _record  # noqa: N815

            def do_GET(self):  # noqa: N802
                self.reply(200, fake.exposition.encode(), "text/plain; version=0.0.4")

        self._http = LocalServer(Handler)
        self.url = self._http.url

    def close(self):
        self._http.close()
