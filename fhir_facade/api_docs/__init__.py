"""`GET /docs`: Swagger UI for the OpenAPI document, served entirely by the facade (ADR 0021).

FastAPI's own /docs and /redoc pages load their scripts and styles from a CDN (jsDelivr), so on a
hospital network without internet they are blank. Here the Swagger UI bundle comes from the PyPI
package `fastapi-offline` (installed with the facade, only its `static/` files are used) and our
initializer script from `static/` next to this module; both are served under /docs/static. The
page has no inline script or style, so its Content-Security-Policy can allow scripts and styles
from 'self' only. ReDoc is not offered: its styled-components inject <style> elements at run time,
which a `style-src 'self'` policy refuses.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

__all__ = ["DOCS_CSP", "DOCS_PATH", "STATIC_PATH", "install_api_docs"]

DOCS_PATH = "/docs"
STATIC_PATH = f"{DOCS_PATH}/static"

#: Everything from the facade itself. `img-src data:`: swagger-ui.css draws its icons as data: URIs;
#: `connect-src 'self'`: the page fetches the document and "Try it out" calls the API.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_HEADERS = {
    "Content-Security-Policy": DOCS_CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

_OWN_STATIC = Path(__file__).parent / "static"


def _page(title: str, root: str, openapi_url: str) -> str:
    static = escape(root + STATIC_PATH)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" type="image/png" href="{static}/favicon.png">'
        f'<link rel="stylesheet" href="{static}/swagger-ui.css">'
        f'</head><body><div id="swagger-ui" data-openapi-url="{escape(root + openapi_url)}"></div>'
        f'<script src="{static}/swagger-ui-bundle.js"></script>'
        f'<script src="{static}/swagger-initializer.js"></script>'
        "</body></html>"
    )


def install_api_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs and its assets under /docs/static. Create `app` with
    `docs_url=None, redoc_url=None` so FastAPI's CDN pages are not mounted as well."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("create the app with docs_url=None and redoc_url=None")
    if app.openapi_url is None:
        raise ValueError("the app serves no OpenAPI document to show")
    openapi_url = app.openapi_url
    title = f"{app.title} {app.version}: API"
    app.mount(
        STATIC_PATH,
        StaticFiles(directory=_OWN_STATIC, packages=[("fastapi_offline", "static")]),
        name="api-docs-static",
    )

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return HTMLResponse(_page(title, root, openapi_url), headers=_HEADERS)
