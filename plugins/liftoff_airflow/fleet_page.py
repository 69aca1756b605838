"""The fleet page and a host's audit page (``GET /liftoff/fleet``, ``GET /liftoff/fleet/hosts/{host}``).

Each is a shell without data: the script (static/fleet.js) fetches the JSON (``/liftoff/api/fleet``,
``/liftoff/api/hosts/{host}/audit``) with the browser's Airflow session cookie and puts every value
in as text, so a lock reason ``<script>...`` shows as text. The only values the shell holds (where
the app is mounted, the Airflow UI's root, the host name) are HTML-escaped. The script and the
style are inlined under a per-response CSP nonce; nothing else may run, and the page only talks
to its own origin.

The elements the browser tests find (``data-testid``): ``fleet-root`` (``data-state``: ``loading``,
``ok`` once the JSON has loaded, ``error`` with ``fleet-error`` shown; ``data-refresh-ms``: when
it reads again), ``updated-at``, ``weekly-lock``, ``progress``, ``halts``, ``freezes`` (items
``freeze-{env}``, ``class="bad"`` while in force), ``patches``,
``approvals``, ``runs`` (rows ``run-{dag_id}-{run_id}``) and per environment what fleet.js
builds (``env-{env}``, ``env-{env}-version``, ``role-{env}-{role}``, ``lock-{env}``,
``oos-{env}-{host}``, ``failed-{env}-{host}``, ``chef-{env}``, ``canary-{env}-{lb}``,
``canary-agree-{env}``). The host page: ``host-info`` and the ``audit`` table (rows ``audit-{id}``).
"""

from __future__ import annotations

import secrets
from html import escape
from pathlib import Path

from fastapi.responses import HTMLResponse

STATIC = Path(__file__).resolve().parent / "static"
SCRIPT = (STATIC / "fleet.js").read_text()
STYLE = (STATIC / "fleet.css").read_text()

FLEET_BODY = """
<section><h2>Running deploy</h2><div data-testid="progress">loading…</div></section>
<section><h2>Halts</h2><div data-testid="halts">loading…</div></section>
<section><h2>Change freezes</h2><div data-testid="freezes">loading…</div></section>
<section><h2>Pending approvals</h2><div data-testid="approvals">loading…</div></section>
<section><h2>Canary judge</h2><div data-testid="canary-analyses">loading…</div></section>
<section><h2>Recent runs</h2>
<table data-testid="runs"><thead><tr><th>DAG</th><th>run</th><th>state</th><th>stages</th><th>note</th></tr>
</thead><tbody></tbody></table></section>
<section><h2>Active patches</h2><div data-testid="patches">loading…</div></section>
<div id="envs"></div>
"""

HOST_BODY = """
<p data-testid="host-info">loading…</p>
<table data-testid="audit"><thead><tr><th>at</th><th>run</th><th>env</th><th>command</th><th>exit</th>
<th>duration</th><th>output (failed commands)</th></tr></thead><tbody></tbody></table>
"""


def shell(api: str, ui: str, host: str | None = None, nonce: str = "") -> str:
    """The page's HTML: ``api`` where the app is mounted (``/liftoff``), ``ui`` the Airflow UI's
    root (``""``), ``host`` for a host's audit page."""
    a = escape(api, quote=True)
    title = f"liftoff: {host}" if host else "liftoff fleet"
    back = f' <a href="{a}/fleet">fleet</a>' if host else ""
    header = (f"<header><h1>{escape(title)}</h1>{back}<span>updated <span data-testid=\"updated-at\">"
              f"never</span></span>")
    if not host:
        header += "<span>weekly change lock: <span data-testid=\"weekly-lock\">?</span></span>"
    header += f' <a href="{escape(ui, quote=True)}/">Airflow</a></header>'
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style nonce=\"{nonce}\">{STYLE}</style></head>\n<body>"
            f'<main data-testid="fleet-root" data-state="loading" data-page="{"host" if host else "fleet"}" '
            f'data-api="{a}" data-ui="{escape(ui, quote=True)}" data-host="{escape(host or "", quote=True)}">'
            f'{header}<p data-testid="fleet-error" class="error" hidden></p>'
            f"{HOST_BODY if host else FLEET_BODY}</main>\n"
            f'<script nonce="{nonce}">{SCRIPT}</script></body></html>\n')


def page(api: str, ui: str, host: str | None = None) -> HTMLResponse:
    """The page with its headers: no caching, a CSP that runs only its own script and style,
    framed only by its own origin (the Airflow UI may show it)."""
    nonce = secrets.token_urlsafe(16)
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
    return HTMLResponse(shell(api, ui, host, nonce), headers={
        "Cache-Control": "no-store", "Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin"})
