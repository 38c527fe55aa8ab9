"""`/app`: the SMART imaging app's files, served by the facade under a strict Content-Security-Policy
(ADR 0043).

The app is static: HTML, ES modules and CSS from `static/` next to this module, and one third-party
script, fhirclient's browser build, from the vendor folder `scripts/install_web_vendor.py` fills
(`.web-vendor/fhirclient/build/fhir-client.min.js`, pinned by sha512 in web/vendor.json). Nothing is
fetched from anywhere else at run time, and the policy makes sure of it: scripts, styles and
connections to 'self' only (plus the token endpoint of an external authorization server, which the
app must POST to), images from 'self', `data:` (the saliency PNG inside its DiagnosticReport) and
`blob:` (previews a page makes in memory).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_facade.fhir.errors import error
from fhir_facade.fhir.responses import error_response

__all__ = [
    "APP_PATH",
    "FHIRCLIENT_FILE",
    "STATIC_DIR",
    "WebAppFiles",
    "content_security_policy",
]

APP_PATH = "/app"
STATIC_DIR = Path(__file__).parent / "static"
#: fhirclient's browser build inside the vendor folder (web/vendor.json: dir fhirclient).
FHIRCLIENT_FILE = Path("fhirclient") / "build" / "fhir-client.min.js"
SETUP_HINT = "run `bash scripts/setup.sh run` (or `python3 scripts/install_web_vendor.py run`)"

log = logging.getLogger(__name__)


def content_security_policy(connect_origins: Iterable[str] = ()) -> str:
    """The policy of every /app response. `connect_origins`: origins besides 'self' the app may
    call (an external authorization server's token endpoint); nothing else ever."""
    connect = " ".join(["'self'", *sorted(set(connect_origins))])
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        f"connect-src {connect}; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )


class _SecurityHeaders:
    """Adds the policy and its companions to every response of the wrapped app, errors included."""

    def __init__(self, app: ASGIApp, csp: str) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", csp.encode("latin-1")),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            # A new version of the app must reach the browser at once; files are small.
            (b"cache-control", b"no-cache"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in self.headers}
                kept = [(n, v) for n, v in message.get("headers", []) if n.lower() not in names]
                message = {**message, "headers": kept + self.headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class WebAppFiles:
    """The ASGI app mounted at /app: `/app/` and `/app` lead to the launch page, `/app/vendor/
    fhir-client.min.js` comes from the vendor folder (503 OperationOutcome when it was never
    installed), everything else from `static/`."""

    def __init__(self, vendor_dir: Path, *, connect_origins: Iterable[str] = ()) -> None:
        self.vendor_dir = vendor_dir
        self.fhirclient = vendor_dir / FHIRCLIENT_FILE
        if not self.fhirclient.is_file():
            log.warning(
                "The SMART app at %s cannot start: %s is missing; %s", APP_PATH, self.fhirclient, SETUP_HINT
            )
        inner = Starlette(
            routes=[
                Route("/", self._to_launch, methods=["GET", "HEAD"]),
                Route("/vendor/fhir-client.min.js", self._fhirclient, methods=["GET", "HEAD"]),
                Mount("/", StaticFiles(directory=STATIC_DIR, html=False)),
            ]
        )
        self.app = _SecurityHeaders(inner, content_security_policy(connect_origins))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    async def _to_launch(self, request: Request) -> Response:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return RedirectResponse(f"{root}/launch.html", status_code=302)

    async def _fhirclient(self, request: Request) -> Response:
        if not self.fhirclient.is_file():
            log.error("GET %s: %s is missing; %s", request.url.path, self.fhirclient, SETUP_HINT)
            problem = error(
                503,
                "exception",
                f"The SMART app's browser library (fhirclient) is not installed here: {SETUP_HINT}.",
            )
            return error_response(problem, request)
        return FileResponse(self.fhirclient, media_type="text/javascript")
