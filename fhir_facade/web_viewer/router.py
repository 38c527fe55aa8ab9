"""`/viewer/`: the OHIF viewer served from its prebuilt dist, configured for the facade (ADR 0044).

The files are public (they are OHIF's code, the same for every user); the images are not: every
DICOMweb request OHIF makes goes to the facade's /dicom-web proxy with the user's SMART token,
and the proxy applies the token's scopes and patient confinement (ADR 0016) like for any client.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from fhir_facade.config import REPO_WEB_VENDOR, Settings
from fhir_facade.web_viewer.dist import DistFile, ViewerDist, content_type, is_hashed
from fhir_facade.web_viewer.pages import ViewerPages

__all__ = ["VIEWER_CSP", "VIEWER_PATH", "build_viewer_router", "default_dist_dir"]

log = logging.getLogger(__name__)

VIEWER_PATH = "/viewer"

#: What OHIF 3.13 needs and nothing from another host (each source is argued in ADR 0044):
#: 'wasm-unsafe-eval': the image decoders (OpenJPEG, CharLS, libjpeg-turbo, HTJ2K) are WebAssembly;
#: 'unsafe-eval': OHIF's DICOM SEG loader (dcmjs / @cornerstonejs/adapters) reshapes the mask with
#: the `ndarray` package, which builds its array classes with `new Function(...)`; without it a
#: Segmentation (the AI saliency region, ADR 0035) fails to load. Scripts still come only from
#: 'self' and no inline script runs;
#: worker-src 'self' blob:: the decode and compute workers are same-origin module scripts, and
#: onnxruntime-web (the segmentation AI tools) starts its proxy worker from a blob: URL;
#: style-src 'unsafe-inline': React and the UI kit set inline styles and inject <style> elements;
#: img-src data: blob:: icons as data: URIs, thumbnails and viewport snapshots as blob: URLs;
#: connect-src 'self' data: blob:: DICOMweb through the facade, and fetches of wasm/fonts and
#: workers' blob: and data: URLs.
VIEWER_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "connect-src 'self' data: blob:; media-src 'self' blob:; manifest-src 'self'; "
    "base-uri 'self'; form-action 'none'; frame-ancestors 'self'; object-src 'none'"
)

_SECURITY_HEADERS = {
    "Content-Security-Policy": VIEWER_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Cross-origin isolation: every subresource is the facade's own, and it lets cornerstone use
    # SharedArrayBuffer for volumes (it falls back without).
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}

#: Hashed names are content-addressed: cache for a year. The rest (unhashed files, the generated
#: pages) is revalidated, so a new dist or setting shows up at the next load.
_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"


def default_dist_dir() -> Path:
    """The dist scripts/setup.sh installs in the checkout (web/vendor.json: @ohif/app ->
    .web-vendor/ohif/dist), where FACADE_WEB_APP_VENDOR_DIR points by default."""
    return REPO_WEB_VENDOR / "ohif" / "dist"


def _headers(cache: str) -> dict[str, str]:
    return {**_SECURITY_HEADERS, "Cache-Control": cache}


def _not_installed(dist_dir: Path, reason: str) -> APIRouter:
    """Viewer on but no dist: /viewer/ says why instead of a bare 404."""
    router = APIRouter(include_in_schema=False)
    message = (
        f"The OHIF viewer is not installed ({reason}); run scripts/setup.sh or set FACADE_VIEWER_DIST_DIR."
    )

    @router.get(VIEWER_PATH + "/{path:path}")
    async def missing(path: str) -> Response:
        return PlainTextResponse(message, status_code=404, headers=_headers(_REVALIDATE))

    log.warning("viewer: %s: %s", dist_dir, reason)
    return router


def build_viewer_router(settings: Settings) -> APIRouter:
    """GET /viewer/...: the dist's files (streamed; the few that carry the site root rebased), the
    facade's index.html and app-config.js, and index.html for every other path without a file
    suffix (OHIF's client-side routes such as /viewer/viewer?StudyInstanceUIDs=...)."""
    dist_dir = settings.viewer.dist_dir or settings.web_app.vendor_dir / "ohif" / "dist"
    prefix = urlsplit(settings.public_root).path.rstrip("/")  # a reverse proxy's path prefix
    public_path = f"{prefix}{VIEWER_PATH}/"
    try:
        dist = ViewerDist(dist_dir, public_path)
    except (FileNotFoundError, ValueError) as error:
        return _not_installed(dist_dir, str(error))
    pages = ViewerPages(
        public_path=public_path,
        dicomweb_root=settings.dicomweb_proxy_url,
        auth_required=settings.auth == "smart",
        launch_url=f"{prefix}/app/launch.html",
        app_bundle=dist.app_bundle,
        app_css=dist.app_css,
    )
    index = pages.index_html().encode()
    app_config = pages.app_config().encode()
    router = APIRouter(include_in_schema=False)

    def page(content: bytes, media_type: str) -> Response:
        return Response(content, media_type=media_type, headers=_headers(_REVALIDATE))

    @router.get(VIEWER_PATH)
    async def viewer_root() -> Response:
        return RedirectResponse(public_path, status_code=308)

    @router.api_route(VIEWER_PATH + "/{path:path}", methods=["GET", "HEAD"])
    async def viewer_file(path: str) -> Response:
        if path in ("", "index.html"):
            return page(index, "text/html; charset=utf-8")
        if path == "app-config.js":
            return page(app_config, "text/javascript; charset=utf-8")
        found = await run_in_threadpool(dist.find, path)  # the first read of a bundle rebases it
        if found is not None:
            return _file_response(found)
        if "." in PurePosixPath(path).name:  # an asset that is not there: no HTML in its place
            return PlainTextResponse("Not found", status_code=404, headers=_headers(_REVALIDATE))
        return page(index, "text/html; charset=utf-8")  # one of OHIF's client-side routes

    return router


def _file_response(found: DistFile) -> Response:
    cache = _IMMUTABLE if is_hashed(found.name) else _REVALIDATE
    media_type = content_type(found.name)
    if found.content is not None:
        return Response(found.content, media_type=media_type, headers=_headers(cache))
    return FileResponse(found.path, media_type=media_type, headers=_headers(cache))
