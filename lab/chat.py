"""The lab's chat: a Slack/Mattermost-style incoming webhook on the lab's loopback network.

``python -m lab.chat --lab-dir DIR`` (started by ``python -m lab up``) listens on
``config.chat_addr``. ``POST <webhook path>`` with Slack JSON (``text``, ``blocks`` or
``attachments``) is stored as one JSON line in ``<lab>/chat/messages.jsonl`` and answered
``200 ok``; another path gets ``404 no_service`` and a body that is not Slack JSON ``400``, as
Slack answers. The receiver can be made to fail (``500``, the message is kept with its status)
or to be slow (sleep N s before answering) through ``/-/control``, which ``python -m lab chat
--fail on|off`` and ``--slow SECONDS`` call; the setting survives a restart
(``<lab>/chat/control.json``).

Other endpoints: ``GET /health``, ``GET /messages`` (JSON list), ``DELETE /messages``,
``GET|POST /-/control`` (``{"fail": bool, "slow_s": float}``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lab.config import LabConfig

MAX_BODY = 1 << 20
MAX_SLOW_S = 600.0


def webhook_path(config: LabConfig) -> str:
    """The lab webhook's path, Slack style; the token part is derived from the lab directory."""
    token = hashlib.sha256(f"lab-chat:{config.lab_dir}".encode()).hexdigest()[:24]
    return f"/services/TLAB0CHAT/BLAB0HOOK/{token}"


def url(config: LabConfig, path: str = "") -> str:
    return f"http://{config.chat_addr}{path}"


def messages_file(config: LabConfig) -> Path:
    return config.path("chat", "messages.jsonl")


def control_file(config: LabConfig) -> Path:
    return config.path("chat", "control.json")


def read_messages(config: LabConfig) -> list[dict]:
    """Every message the receiver got (oldest first), whether it answered 200 or not."""
    file = messages_file(config)
    if not file.exists():
        return []
    out = []
    for line in file.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def event_of(message: dict) -> str:
    """The liftoff event of a stored message (its attachment footer ``liftoff · DAG · EVENT``)."""
    for attachment in (message.get("payload") or {}).get("attachments") or []:
        footer = str(attachment.get("footer") or "")
        if footer.startswith("liftoff"):
            return footer.rsplit("·", 1)[-1].strip()
    return ""


def text_of(message: dict) -> str:
    payload = message.get("payload") or {}
    if payload.get("text"):
        return str(payload["text"])
    for attachment in payload.get("attachments") or []:
        if attachment.get("fallback") or attachment.get("text"):
            return str(attachment.get("fallback") or attachment.get("text"))
    return json.dumps(payload.get("blocks") or payload)[:200]


def control(config: LabConfig, body: dict | None = None, timeout: float = 10.0) -> dict:
    """Read (``body`` None) or change the receiver's fail/slow setting; OSError when it is down."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url(config, "/-/control"), data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def clear(config: LabConfig, timeout: float = 10.0) -> None:
    req = urllib.request.Request(url(config, "/messages"), method="DELETE")
    with urllib.request.urlopen(req, timeout=timeout):
        pass


class Receiver:
    """The receiver's state: its setting and the message log."""

    def __init__(self, config: LabConfig):
        self.config = config
        self.path = webhook_path(config)
        self.lock = threading.Lock()
        messages_file(config).parent.mkdir(parents=True, exist_ok=True)
        self.seq = len(read_messages(config))
        self.setting = {"fail": False, "slow_s": 0.0}
        with contextlib.suppress(OSError, ValueError):
            self.setting.update(self._valid(json.loads(control_file(config).read_text())))

    @staticmethod
    def _valid(body: Any) -> dict:
        if not isinstance(body, dict) or set(body) - {"fail", "slow_s"}:
            raise ValueError('expected {"fail": true|false, "slow_s": SECONDS}')
        out: dict[str, Any] = {}
        if "fail" in body:
            if not isinstance(body["fail"], bool):
                raise ValueError("fail must be true or false")
            out["fail"] = body["fail"]
        if "slow_s" in body:
            slow = body["slow_s"]
            if isinstance(slow, bool) or not isinstance(slow, int | float) or not 0 <= slow <= MAX_SLOW_S:
                raise ValueError(f"slow_s must be a number of seconds within 0..{MAX_SLOW_S:g}")
            out["slow_s"] = float(slow)
        return out

    def change(self, body: Any) -> dict:
        with self.lock:
            self.setting.update(self._valid(body))
            control_file(self.config).write_text(json.dumps(self.setting))
            return dict(self.setting)

    def record(self, path: str, status: int, payload: dict) -> dict:
        with self.lock:
            self.seq += 1
            entry = {"seq": self.seq, "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                     "status": status, "path": path, "payload": payload}
            with messages_file(self.config).open("a") as f:
                f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            return entry

    def clear(self) -> None:
        with self.lock:
            messages_file(self.config).write_text("")
            self.seq = 0


def handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lab-chat/1"

        def log_message(self, fmt: str, *args: Any) -> None:  # no request paths (tokens) in the log
            pass

        def reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else (
                body.encode() if isinstance(body, str) else json.dumps(body).encode())
            if isinstance(body, str):
                content_type = "text/plain; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client may have given up (slow mode)
                self.wfile.write(data)

        def body(self) -> bytes | None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.reply(413, "request_too_large")
                return None
            return self.rfile.read(length) if length else b""

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self.reply(200, {"ok": True, **receiver.setting})
            elif self.path == "/messages":
                self.reply(200, read_messages(receiver.config))
            elif self.path == "/-/control":
                self.reply(200, dict(receiver.setting))
            else:
                self.reply(404, "not_found")

        def do_DELETE(self) -> None:  # noqa: N802
            if self.path == "/messages":
                receiver.clear()
                self.reply(200, {"cleared": True})
            else:
                self.reply(404, "not_found")

        def do_POST(self) -> None:  # noqa: N802
            raw = self.body()
            if raw is None:
                return
            if self.path == "/-/control":
                try:
                    self.reply(200, receiver.change(json.loads(raw or b"null")))
                except ValueError as e:
                    self.reply(400, {"error": str(e)})
                return
            if self.path != receiver.path:
                self.reply(404, "no_service")
                return
            try:
                payload = json.loads(raw)
            except ValueError:
                self.reply(400, "invalid_payload")
                return
            if not isinstance(payload, dict):
                self.reply(400, "invalid_payload")
                return
            text = payload.get("text")
            if not (isinstance(text, str) and text.strip()) and not payload.get("blocks") \
                    and not payload.get("attachments"):
                self.reply(400, "no_text")
                return
            setting = dict(receiver.setting)
            if setting["slow_s"]:
                time.sleep(setting["slow_s"])
            if setting["fail"]:
                receiver.record("webhook", 500, payload)
                self.reply(500, "lab chat receiver failing on purpose (python -m lab chat --fail off)")
                return
            receiver.record("webhook", 200, payload)
            self.reply(200, "ok")

    return Handler


def serve(config: LabConfig) -> None:
    host, port = config.chat_addr.rsplit(":", 1)
    receiver = Receiver(config)
    server = ThreadingHTTPServer((host, int(port)), handler(receiver))
    server.daemon_threads = True
    print(f"lab chat receiver on http://{config.chat_addr} (fail={receiver.setting['fail']}, "
          f"slow_s={receiver.setting['slow_s']:g}); messages in {messages_file(config)}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


# -- `python -m lab chat` --------------------------------------------------------------------------

def format_messages(messages: list[dict], last: int | None = None) -> str:
    shown = messages[-last:] if last else messages
    if not shown:
        return "no chat messages"
    out = []
    for m in shown:
        when = str(m.get("time", ""))[11:19]
        status = "" if m.get("status") == 200 else f" [HTTP {m.get('status')}]"
        event = event_of(m)
        lines = text_of(m).splitlines() or [""]
        out.append(f"#{m.get('seq')} {when}{status} {f'({event}) ' if event else ''}{lines[0]}")
        out += [f"    {line}" for line in lines[1:]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.chat", description="the lab's chat receiver")
    p.add_argument("--lab-dir", required=True)
    args = p.parse_args(argv)
    serve(LabConfig.load(Path(args.lab_dir)))
    return 0


def unavailable(config: LabConfig, exc: OSError) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return f"the chat receiver does not answer at {url(config)}: {reason} (python -m lab up starts it)"


if __name__ == "__main__":
    sys.exit(main())
