"""PACS links in DICOMweb answers, rewritten to name the proxy (ADR 0016).

QIDO-RS, WADO-RS metadata and STOW-RS answers carry URLs: Retrieve URL (0008,1190) and Retrieve
URI (0040,E010), both VR UR, and the BulkDataURI of bulk data elements (PS3.18 F.2.2 JSON,
F.3.1 XML `<BulkData URI=...>`). The PACS writes them with the base it believes it has: Orthanc's
DICOMweb plugin uses its `DicomWeb.Host`/`Ssl` settings when set, else the Host (or
X-Forwarded-Host, Forwarded) header of the request, always followed by its `Root`. A client that
follows such a link goes around the facade: past the token check, or nowhere when the PACS is not
reachable from the client. So every URL whose path starts with the PACS's DICOMweb root path
(FACADE_DICOMWEB_URL's path) followed by `/studies/` has its scheme, host and root replaced by the
proxy's base, whatever host the PACS wrote: the facade cannot see Orthanc's `Host` setting, and the
path is what it always keeps.

The rewrite works on the bytes of JSON and XML, chunk by chunk (a study's metadata can be
megabytes): a link value starts right after `"` (JSON string, XML attribute) or `>` (XML element
text), so free text that merely mentions a URL is left alone, and a match is bounded in length,
so a chunk boundary is handled by holding back at most that many bytes.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterable, AsyncIterator
from urllib.parse import urlsplit

__all__ = ["LinkRewriter", "gzip_stream"]

# Longest authority (host:port, userinfo) a link may carry to be recognised; longer ones are not
# URLs Orthanc writes (RFC 1035 names are at most 253 octets).
_MAX_AUTHORITY = 255
_STUDIES = b"/studies/"


class LinkRewriter:
    """Replaces the PACS's base in URL values with `proxy_base` (both absolute http(s) URLs)."""

    def __init__(self, pacs_url: str, proxy_base: str) -> None:
        pacs, proxy = urlsplit(pacs_url), urlsplit(proxy_base)
        if pacs.scheme not in ("http", "https") or not pacs.netloc:
            raise ValueError(f"pacs_url must be an absolute http(s) URL, got {pacs_url!r}")
        if proxy.scheme not in ("http", "https") or not proxy.netloc:
            raise ValueError(f"proxy_base must be an absolute http(s) URL, got {proxy_base!r}")
        self.proxy_base = proxy_base.rstrip("/")
        root = pacs.path.rstrip("/").encode()
        self._replacement = self.proxy_base.encode()
        # delimiter, then scheme://authority + the PACS's root path, then (not consumed) /studies/
        delimiter = rb'(["\'>])'
        origin = rb'(?i:https?)://[^/"\'<>\s\\?#]{1,%d}' % _MAX_AUTHORITY
        self._pattern = re.compile(delimiter + origin + re.escape(root) + rb"(?=%s)" % re.escape(_STUDIES))
        # Bytes a match can span, plus the lookahead: what a chunk boundary may cut.
        self._window = 1 + len(b"https://") + _MAX_AUTHORITY + len(root) + len(_STUDIES)

    def _sub(self, data: bytes) -> bytes:
        return self._pattern.sub(lambda m: m.group(1) + self._replacement, data)

    def rewrite(self, data: bytes) -> bytes:
        """A whole answer body with every PACS link pointing at the proxy."""
        return self._sub(data)

    def rewrite_url(self, url: str) -> str:
        """One URL (a Location or Content-Location header value)."""
        return self._sub(b'"' + url.encode("utf-8", "surrogateescape"))[1:].decode("utf-8", "surrogateescape")

    async def stream(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """`chunks` rewritten as they arrive; holds back only the tail a link could straddle.

        The tail is as long as a match with its lookahead, so a match that starts before the cut
        is wholly in the buffer; the cut is moved past one (with its lookahead) that crosses it. A
        match starting after the cut is found again, with more text, in the next round.
        """
        pending = b""
        async for chunk in chunks:
            pending += chunk
            cut = len(pending) - self._window
            if cut <= 0:
                continue
            for match in self._pattern.finditer(pending, max(0, cut - self._window)):
                if match.start() < cut < match.end() + len(_STUDIES):
                    cut = match.end() + len(_STUDIES)
                    break
            out, pending = self._sub(pending[:cut]), pending[cut:]
            if out:
                yield out
        if pending:
            yield self._sub(pending)


async def gzip_stream(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """`chunks` gzip-encoded (RFC 1952) as they go, for a client that accepts gzip."""
    encoder = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    async for chunk in chunks:
        out = encoder.compress(chunk)
        if out:
            yield out
    yield encoder.flush()
