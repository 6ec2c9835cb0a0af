"""The live web dashboard: static HTML, JS and CSS served by the admin API.

    GET /dashboard            the page (index.html)
    GET /dashboard/app.js     vanilla JS: polls GET /live?node=1 every 2 s (every worker
                              process of the node; a partial view is marked PARTIAL),
                              keeps a ring of points, draws rates per provider and source
                              on <canvas>, queue depths, holds in force and recent errors;
                              suspend/resume a site on every worker through POST
                              /control/suspend?node=1 and /control/resume?node=1
    GET /dashboard/style.css

The page and its assets are served without a token (they hold no data); every data call
the page makes carries `Authorization: Bearer <token>`, the token typed into its login form
and kept in sessionStorage (never in a URL). No CDN, no build step, no external fetch: the
Content-Security-Policy allows the page's own origin only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

_HERE = Path(__file__).resolve().parent
ASSETS = {"/dashboard": ("index.html", "text/html"),
          "/dashboard/": ("index.html", "text/html"),
          "/dashboard/app.js": ("app.js", "text/javascript"),
          "/dashboard/style.css": ("style.css", "text/css")}
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                       "frame-ancestors 'none'; form-action 'none'"}


def _asset(name: str, content_type: str) -> Any:
    body = (_HERE / name).read_bytes()   # read once at start: the package's files

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers=_HEADERS)
    return handler


def install(admin: Any) -> None:
    """Serve the dashboard from `admin` (an AdminServer): its own handlers, public."""
    for path, (name, ctype) in ASSETS.items():
        admin.handlers[("GET", path)] = _asset(name, ctype)
        admin.public.add(path)
