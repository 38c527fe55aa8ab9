"""OHIF's prebuilt dist as the facade serves it under a path prefix (ADR 0044).

The dist of `@ohif/app` 3.13 is built for the site root: its index.html names `/app.bundle.*.js`,
the rspack runtime of every bundle sets `__webpack_require__.p = "/"` (the public path that chunk,
worker and wasm URLs are built from), and app.bundle.css loads its font from `url(/...)`. OHIF has
no run-time setting for that public path (`window.PUBLIC_URL` only feeds the router), so the few
files that carry it are rebased: the literal root is replaced by the mount path once, on first
request, and the result kept in memory (about 18 MB for 3.13.2). Every other file is streamed from
disk as it is.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["DistFile", "ViewerDist", "content_type", "is_hashed"]

#: Types browsers insist on: module workers and `import()` need a JavaScript type, and
#: WebAssembly.instantiateStreaming needs application/wasm (Python's mimetypes lacks some of these).
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
    ".jsonc": "application/json",
}

#: rspack names emitted chunks and assets with a 16-hex content hash (`app.bundle.0f6159c501addfe9.js`,
#: `0ddf166f7a343eda.wasm`): such a name never changes content, so it may be cached for a year.
_HASHED = re.compile(r"(^|[.-])[0-9a-f]{16}\.[a-z0-9]+$")

#: Files the facade never serves from the dist: its own app-config.js and index.html replace OHIF's;
#: the service worker (sw.js, init-service-worker.js) would cache the viewer and load Workbox from
#: storage.googleapis.com; google.js is a Google Cloud Healthcare configuration; the netlify/serve
#: files are deploy metadata.
EXCLUDED = frozenset(
    {
        "app-config.js",
        "index.html",
        "sw.js",
        "init-service-worker.js",
        "google.js",
        "_headers",
        "_redirects",
        "serve.json",
        "silent-refresh.html",
        "oidc-client.min.js",
    }
)

_APP_BUNDLE = re.compile(r'src="/(app\.bundle\.[0-9a-f]+\.js)"')
_APP_CSS = re.compile(r'href="/(app\.bundle[^"]*\.css)"')


def content_type(name: str) -> str:
    """The Content-Type of a dist file, by its suffix (application/octet-stream when unknown)."""
    return _TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")


def is_hashed(name: str) -> bool:
    """Whether a dist file name carries rspack's content hash (immutable, cacheable for a year)."""
    return bool(_HASHED.search(PurePosixPath(name).name))


@dataclass(frozen=True)
class DistFile:
    """One file to answer with: either `path` on disk (streamed) or rebased `content`."""

    name: str
    path: Path
    content: bytes | None = None


class ViewerDist:
    """The files of OHIF's dist folder `root`, rebased for `public_path` (e.g. "/viewer/")."""

    def __init__(self, root: Path, public_path: str) -> None:
        if not public_path.startswith("/") or not public_path.endswith("/"):
            raise ValueError(f"public_path {public_path!r} must start and end with '/'")
        self.root = root.resolve()
        self.public_path = public_path
        self._rebased: dict[str, bytes | None] = {}
        self._lock = threading.Lock()
        index = self.root / "index.html"
        if not index.is_file():
            raise FileNotFoundError(f"{index} is missing: the OHIF dist is not installed (scripts/setup.sh)")
        html = index.read_text(encoding="utf-8")
        bundle, css = _APP_BUNDLE.search(html), _APP_CSS.search(html)
        if bundle is None or css is None:
            raise ValueError(f"{index} names no app.bundle script or stylesheet: not an OHIF 3 dist")
        #: The entry script and stylesheet the shipped index.html loads (names carry the build hash).
        self.app_bundle = bundle.group(1)
        self.app_css = css.group(1)

    def find(self, name: str) -> DistFile | None:
        """The dist file at relative URL path `name`, or None (missing, excluded, or outside the
        dist: `..` and absolute paths never leave it)."""
        parts = PurePosixPath(name).parts
        if not parts or any(p in ("..", ".", "") or "\\" in p or p.startswith("/") for p in parts):
            return None
        if len(parts) == 1 and parts[0] in EXCLUDED:
            return None
        path = self.root.joinpath(*parts)
        try:
            if not path.resolve().is_relative_to(self.root) or not path.is_file():
                return None
        except OSError:
            return None
        return DistFile(name, path, self._rebased_content(name, path))

    def _rebased_content(self, name: str, path: Path) -> bytes | None:
        suffix = path.suffix
        if suffix not in (".js", ".css") or "/" in name:
            return None  # only the top-level bundles and stylesheets carry the root
        with self._lock:
            if name in self._rebased:
                return self._rebased[name]
            original = path.read_bytes()
            rebased = self.rebase(original, suffix)
            self._rebased[name] = rebased if rebased != original else None
            return self._rebased[name]

    def rebase(self, content: bytes, suffix: str) -> bytes:
        """`content` with the site-root URLs the build baked in moved under the public path."""
        prefix = self.public_path.encode()
        if suffix == ".css":
            return content.replace(b"url(/", b"url(" + prefix)
        content = content.replace(
            b'__webpack_require__.p = "/";', b'__webpack_require__.p = "' + prefix + b'";'
        )
        # The microscopy mode imports its viewer library by an absolute path (pluginImports.js).
        return content.replace(b"'/dicom-microscopy-viewer/", b"'" + prefix + b"dicom-microscopy-viewer/")
