"""The DICOMweb proxy's routes (DICOM PS3.18): QIDO-RS, WADO-RS and STOW-RS under /dicom-web, each
authorized with the caller's SMART scopes on ImagingStudy and confined to the patient in context.

- QIDO-RS (PS3.18 10.6) needs `s` on ImagingStudy; WADO-RS (10.4: instances, metadata, frames,
  rendered, thumbnail, bulkdata) needs `r`; STOW-RS (10.5) needs `c`.
- Unconfined (user/ or system/ grant, or FACADE_AUTH=none): the request goes to the PACS as it
  came (path, query string, Accept), and the answer comes back as the PACS sent it, streamed.
- Confined to a patient (only patient/ grants): QIDO queries get the patient's PatientID (and
  issuer) in place of any the client sent, and answers are filtered on the exact patient;
  study-scoped queries and every WADO-RS first check that the study is the patient's (one QIDO
  query), answering as for an unknown study when it is not (QIDO: no matches; WADO: 404), so the
  existence of other patients' studies is not revealed; a STOW-RS body is checked instance by
  instance (see `stow`).
- STOW-RS bodies are never forwarded as sent: they are split strictly and re-encoded (see
  `multipart`), for every caller.
- Links in answers (RetrieveURL, Retrieve URI, BulkDataURI) name the proxy, never the PACS (see
  `links`, ADR 0016): QIDO-RS, metadata and STOW-RS answers are rewritten as they stream through;
  instances, frames, rendered and bulk data are binary, carry no links and pass through untouched.
- A QIDO-RS `includefield` list (`a,b` or `a%2Cb`) is split into one `includefield` per attribute
  (see `include_fields`); the rest of the query string goes as the client sent it.

The caller's Authorization, cookies and any other header not listed in `_FORWARDED_REQUEST_HEADERS`
never reach the PACS. PACS 4xx answers pass through with their status and body; unreachable,
timed-out or failing (5xx) PACS answers become the 503 `dicom_service_unavailable` outcome.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fhir_facade.auth.access import Access, access_of, authenticated_caller, current_access
from fhir_facade.auth.errors import forbidden
from fhir_facade.auth.scopes import Interaction
from fhir_facade.config import Settings
from fhir_facade.dicomweb.client import DicomJson, qido_datasets
from fhir_facade.dicomweb_proxy.client import DICOM_JSON, DicomwebProxyClient, UpstreamResponse
from fhir_facade.dicomweb_proxy.confinement import (
    PatientKeys,
    asked_patient,
    confined_query,
    study_belongs_to,
)
from fhir_facade.dicomweb_proxy.include_fields import split_include_fields
from fhir_facade.dicomweb_proxy.links import LinkRewriter, gzip_stream
from fhir_facade.dicomweb_proxy.multipart import CanonicalBody
from fhir_facade.dicomweb_proxy.stow import (
    DEFAULT_MAX_STOW_BYTES,
    check_confined_stow,
    read_instances,
    read_stow_body,
)
from fhir_facade.fhir.errors import (
    FhirError,
    bad_request,
    not_acceptable,
    not_found,
)
from fhir_facade.fhir.openapi import error_responses

__all__ = ["PREFIX", "build_dicomweb_proxy_router"]

log = logging.getLogger(__name__)

#: Where the router serves DICOMweb (Settings.dicomweb_proxy_url is the public root + this).
PREFIX = "/dicom-web"
RESOURCE_TYPE = "ImagingStudy"

_STUDY = "/studies/{study}"
_SERIES = _STUDY + "/series/{series}"
_INSTANCE = _SERIES + "/instances/{instance}"
_FRAMES = _INSTANCE + "/frames/{frames}"

#: QIDO-RS resources (PS3.18 10.6.1, Table 10.6.1-2).
QIDO_PATHS = (
    "/studies",
    "/series",
    "/instances",
    _STUDY + "/series",
    _STUDY + "/instances",
    _SERIES + "/instances",
)
#: WADO-RS resources (PS3.18 10.4.1, Table 10.4.1-1), and Orthanc's BulkDataURIs
#: (`.../instances/{instance}/bulk/{tag path}`).
WADO_PATHS = (
    *(
        level + suffix
        for level in (_STUDY, _SERIES, _INSTANCE)
        for suffix in ("", "/metadata", "/rendered", "/thumbnail", "/bulkdata")
    ),
    *(_FRAMES + suffix for suffix in ("", "/rendered", "/thumbnail")),
    _INSTANCE + "/bulk/{bulk:path}",
)
#: STOW-RS resources (PS3.18 10.5.1).
STOW_PATHS = ("/studies", _STUDY)

# Request headers that reach the PACS: content negotiation and conditional requests, nothing that
# identifies the caller (Authorization, Cookie) or belongs to this hop.
_FORWARDED_REQUEST_HEADERS = (
    "accept",
    "accept-charset",
    "accept-language",
    "if-none-match",
    "if-modified-since",
)
# Response headers that come back: the representation and its caching, not the PACS's hop headers.
_RETURNED_RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "content-encoding",
    "content-language",
    "content-location",
    "content-disposition",
    "location",
    "warning",
    "etag",
    "last-modified",
    "cache-control",
    "expires",
)

# A UID as the PACS may hold it: DICOM's digits and dots (PS3.5 9.1), tolerating the letters,
# hyphens and underscores some devices write; never empty components (so no "." or ".."), and no
# ",", "*" or "?" that QIDO would read as a list or a wildcard.
_UID = re.compile(r"[0-9A-Za-z_\-]+(?:\.[0-9A-Za-z_\-]+)*")
_FRAME_LIST = re.compile(r"[1-9][0-9]*(?:,[1-9][0-9]*)*")  # PS3.18 10.4.1.1.4: frame numbers from 1
_BULK_SEGMENT = re.compile(r"[0-9A-Za-z_\-]+(?:\.[0-9A-Za-z_\-]+)*")
_PLACEHOLDER = re.compile(r"\{(\w+)(?::path)?\}")
_JSON_MEDIA_TYPES = frozenset({DICOM_JSON, "application/json", "application/*", "*/*"})
# Answers that may carry links (PS3.18 F.2 JSON, F.3 XML, alone or as multipart/related parts).
_LINK_MEDIA_TYPES = frozenset({DICOM_JSON, "application/json", "application/dicom+xml", "application/xml"})

Handler = Callable[[Request, str], Awaitable[Response]]


class _ProxiedResponse(StreamingResponse):
    """The PACS's answer streamed back chunk by chunk; the PACS connection is released however the
    response ends (sent, client gone, PACS failing half-way).

    With `rewrite`, a JSON or XML body has its PACS links replaced as it streams (`links`), and is
    gzip-encoded here when `gzip` (the PACS was asked for identity, so that it can be read); other
    bodies pass as raw bytes. Location headers name the proxy in every case.
    """

    def __init__(
        self, upstream: UpstreamResponse, links: LinkRewriter, *, rewrite: bool = False, gzip: bool = False
    ) -> None:
        headers = {
            name.lower(): value
            for name, value in upstream.headers.items()
            if name.lower() in _RETURNED_RESPONSE_HEADERS
        }
        for name in ("location", "content-location"):
            if name in headers:
                headers[name] = links.rewrite_url(headers[name])
        body: AsyncIterable[bytes] = upstream.aiter_raw()
        if rewrite and _carries_links(headers.get("content-type", "")):
            body = links.stream(upstream.aiter_bytes())
            for name in ("content-length", "content-encoding"):
                headers.pop(name, None)
            if "etag" in headers and not headers["etag"].startswith("W/"):
                # The same representation less its PACS links: equivalent, not byte-identical
                # (RFC 9110 8.8.1).
                headers["etag"] = "W/" + headers["etag"]
            headers["vary"] = "Accept-Encoding"
            if gzip:
                body = gzip_stream(body)
                headers["content-encoding"] = "gzip"
        super().__init__(body, status_code=upstream.status_code, headers=headers)
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._upstream.aclose()


def _confinement(access: Access, interaction: Interaction) -> PatientKeys | None:
    patients = access.confinement(interaction, RESOURCE_TYPE)
    if patients is None:
        return None
    try:
        return PatientKeys.from_resource_ids(patients)
    except ValueError as exc:
        raise forbidden(f"The token's patient context is not a Patient id of this server: {exc}") from exc


def _upstream_path(template: str, request: Request) -> str:
    """The PACS path for `template` with the request's path parameters, each validated and
    percent-encoded: the proxy never forwards a path it did not build itself."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        raw = str(request.path_params[name])
        if name == "frames":
            if not _FRAME_LIST.fullmatch(raw):
                raise bad_request(f"frames {raw!r} is not a list of frame numbers such as 1,2,3")
            return raw
        if name == "bulk":
            segments = raw.split("/")
            if not all(_BULK_SEGMENT.fullmatch(s) for s in segments):
                raise bad_request(f"bulkdata path {raw!r} is not a tag path")
            return "/".join(quote(s, safe="") for s in segments)
        if len(raw) > 64 or not _UID.fullmatch(raw):
            raise bad_request(f"{name} {raw!r} is not a DICOM UID")
        return quote(raw, safe="")

    return _PLACEHOLDER.sub(value, template)


def _forwarded_headers(request: Request, *, rewrite: bool = False) -> dict[str, str]:
    headers = {name: request.headers[name] for name in _FORWARDED_REQUEST_HEADERS if name in request.headers}
    # Bytes travel as the PACS encodes them (httpx would otherwise ask for gzip and the raw body
    # would no longer match what our client asked for); answers whose links are rewritten are
    # asked for unencoded and encoded again here (`_ProxiedResponse`).
    headers["accept-encoding"] = "identity" if rewrite else request.headers.get("accept-encoding", "identity")
    return headers


def _carries_links(content_type: str) -> bool:
    """Whether an answer of this media type is DICOM JSON or XML (maybe as multipart/related parts),
    the forms that carry RetrieveURL and BulkDataURI values."""
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media == "multipart/related":
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "type":
                return value.strip().strip('"').lower() in _LINK_MEDIA_TYPES
        return False
    return media in _LINK_MEDIA_TYPES


def _accepts_gzip(request: Request) -> bool:
    """Whether the client's Accept-Encoding (RFC 9110 12.5.3) admits gzip."""
    weights: dict[str, float] = {}
    for item in request.headers.get("accept-encoding", "").split(","):
        coding, _, params = item.partition(";")
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights[coding.strip().lower()] = weight
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0))) > 0


def _accepts_dicom_json(request: Request) -> bool:
    """Whether the client takes a DICOM JSON answer (PS3.18 8.7.3.5.3), which is the only one the
    proxy can filter."""
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return True
    for item in accept.split(","):
        media, _, params = item.partition(";")
        if media.strip().lower() in _JSON_MEDIA_TYPES and "q=0" not in params.replace(" ", "").split(";"):
            return True
    return False


class _Proxy:
    def __init__(self, pacs: DicomwebProxyClient, links: LinkRewriter, max_stow_bytes: int) -> None:
        self.pacs = pacs
        self.links = links
        self.max_stow_bytes = max_stow_bytes

    def endpoint(self, handler: Handler, template: str) -> Callable[[Request], Awaitable[Response]]:
        """A route endpoint running `handler`; every refusal is logged once, at INFO, with its reason."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request, template)
            except FhirError as error:
                if error.status < 500:
                    _log_refusal(request, f"{error.status} {error}")
                raise

        return run

    async def relay(
        self,
        request: Request,
        path: str,
        *,
        headers: dict[str, str],
        query: str | None = None,
        content: AsyncIterable[bytes] | None = None,
        rewrite: bool = False,
    ) -> Response:
        """Forward one request and stream the answer back (`rewrite`: its links made the proxy's;
        the request's `headers` must then have asked for an unencoded answer)."""
        upstream = await self.pacs.open_stream(
            request.method,
            path,
            query=request.url.query if query is None else query,
            headers=headers,
            content=content,
        )
        gzip = rewrite and _accepts_gzip(request)
        return _ProxiedResponse(upstream, self.links, rewrite=rewrite, gzip=gzip)

    async def search(self, request: Request, template: str) -> Response:
        """QIDO-RS (PS3.18 10.6)."""
        access = authenticated_caller()
        access.require(Interaction.SEARCH, RESOURCE_TYPE)
        path = _upstream_path(template, request)
        key = _confinement(access, Interaction.SEARCH)
        raw_query = split_include_fields(request.url.query)
        if key is None:
            headers = _forwarded_headers(request, rewrite=True)
            return await self.relay(request, path, headers=headers, query=raw_query, rewrite=True)
        if not _accepts_dicom_json(request):
            raise not_acceptable(
                "A patient-confined QIDO-RS search is answered in application/dicom+json only"
            )
        study = request.path_params.get("study")
        if study is not None and not await study_belongs_to(self.pacs, study, key):
            # Answered like a search in a study the PACS does not hold (Orthanc: 200 and []).
            _log_refusal(request, f"study {study} is not patient {key.describe()}'s; answered no matches")
            return Response(b"[]", media_type=DICOM_JSON)
        headers = {"accept": DICOM_JSON}
        if "accept-charset" in request.headers:
            headers["accept-charset"] = request.headers["accept-charset"]
        # One query per patient (a user's list may hold several): PatientID is no list key in QIDO.
        found: list[DicomJson] = []
        passed: dict[str, str] = {}
        for one in key.keys:
            query = confined_query(raw_query, one)
            response = await self.pacs.fetch("GET", path, query=query, headers=headers)
            passed = {
                n.lower(): v for n, v in response.headers.items() if n.lower() in ("content-type", "warning")
            }
            if response.status_code >= 400:
                body = self.links.rewrite(response.content)
                return Response(body, status_code=response.status_code, headers=passed)
            if response.content:
                found += qido_datasets(response, path)
        kept = [ds for ds in found if key.matches_json(ds)]
        if len(kept) < len(found):
            # Only a PatientID holding QIDO wildcard or list characters, or an issuer-less patient
            # sharing a PatientID with an issuer-qualified one, gets here: the query already narrows.
            log.info(
                "DICOMweb proxy dropped %d of %d QIDO results of other patients for %s on %s",
                len(found) - len(kept),
                len(found),
                access.who,
                request.url.path,
            )
        if len(key.keys) > 1:
            # A user's list: the client's own patient keys (replaced above by each patient's) pick
            # among the patients, so a search for one of them answers that one only. (A single
            # patient's token keeps ADR 0016's rule: it sees its own studies whatever it asks.)
            asked = asked_patient(raw_query)
            kept = [ds for ds in kept if asked(ds)]
        passed.setdefault("content-type", DICOM_JSON)
        body = self.links.rewrite(json.dumps(kept, ensure_ascii=False).encode("utf-8"))
        return Response(body, headers=passed)

    async def retrieve(self, request: Request, template: str) -> Response:
        """WADO-RS (PS3.18 10.4): instances, metadata, frames, rendered, thumbnail, bulkdata."""
        access = authenticated_caller()
        access.require(Interaction.READ, RESOURCE_TYPE)
        path = _upstream_path(template, request)
        key = _confinement(access, Interaction.READ)
        if key is not None:
            study = request.path_params["study"]
            if not await study_belongs_to(self.pacs, study, key):
                raise not_found(f"No study {study}")
        # Metadata carries BulkDataURIs; instances, frames, rendered and bulk data are binary.
        rewrite = template.endswith("/metadata")
        headers = _forwarded_headers(request, rewrite=rewrite)
        return await self.relay(request, path, headers=headers, rewrite=rewrite)

    async def store(self, request: Request, template: str) -> Response:
        """STOW-RS (PS3.18 10.5): the body split strictly and every instance read; for a confined
        caller every instance checked; then the parts re-encoded under our own boundary, so the
        PACS gets exactly what was read (see `multipart`)."""
        access = authenticated_caller()
        access.require(Interaction.CREATE, RESOURCE_TYPE)
        path = _upstream_path(template, request)
        key = _confinement(access, Interaction.CREATE)
        reader = await read_stow_body(request, self.max_stow_bytes)
        try:
            # pydicom work (about 2 ms an instance) off the event loop, like any blocking call.
            instances = await run_in_threadpool(read_instances, reader)
            if key is not None:
                await check_confined_stow(self.pacs, instances, key)
            body = CanonicalBody(reader)
            headers = _forwarded_headers(request, rewrite=True)  # the answer names the stored instances
            headers["content-type"] = body.content_type
            headers["content-length"] = str(body.length)
            return await self.relay(request, path, headers=headers, content=body.chunks(), rewrite=True)
        finally:
            # The whole request body has been sent once the PACS's answer has begun.
            reader.close()


def _log_refusal(request: Request, reason: str) -> None:
    access = access_of(request) or current_access.get()
    who = access.who if access is not None else "unauthenticated"
    log.info("DICOMweb proxy refused %s %s for %s: %s", request.method, request.url.path, who, reason)


#: The OpenAPI tag of every proxy operation.
OPENAPI_TAG = "DICOMweb"

#: A PACS refusal comes back as the PACS sent it (status, media type and body).
_PACS_4XX = {"4XX": {"description": "The PACS's own refusal, passed through as the PACS sent it"}}
_DICOM_JSON_ANSWER = {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}}

_PATH_PARAMETERS = {
    "study": "Study Instance UID",
    "series": "Series Instance UID",
    "instance": "SOP Instance UID",
    "frames": "Frame numbers, e.g. 1,2,3",
    "bulk": "Orthanc's bulk data tag path",
}

#: Per kind: the summary and the answers (DICOM PS3.18).
_OPENAPI: dict[str, dict[str, Any]] = {
    "qido": {
        "summary": "QIDO-RS search (DICOM PS3.18 10.6)",
        "responses": {
            "200": {"description": "Matching DICOM JSON datasets", "content": _DICOM_JSON_ANSWER},
            "204": {"description": "No matches (as some PACSs answer)"},
            **error_responses(400, 406, 503),
            **_PACS_4XX,
        },
    },
    "wado": {
        "summary": "WADO-RS retrieve (DICOM PS3.18 10.4)",
        "responses": {
            "200": {
                "description": "What Accept asked for: multipart/related DICOM, DICOM JSON metadata, "
                "rendered or thumbnail images, bulk data",
                "content": {
                    "multipart/related": {"schema": {"type": "string", "format": "binary"}},
                    **_DICOM_JSON_ANSWER,
                },
            },
            **error_responses(400, 404, 503),
            **_PACS_4XX,
        },
    },
    "stow": {
        "summary": "STOW-RS store (DICOM PS3.18 10.5)",
        "requestBody": {
            "required": True,
            "content": {
                'multipart/related; type="application/dicom"': {
                    "schema": {"type": "string", "format": "binary"}
                }
            },
        },
        "responses": {
            "200": {"description": "The Store Instances Response Module", "content": _DICOM_JSON_ANSWER},
            "202": {"description": "Some instances were stored (warnings in the answer)"},
            **error_responses(400, 415, 503),
            **_PACS_4XX,
        },
    },
}


def build_dicomweb_proxy_router(
    settings: Settings,
    pacs: DicomwebProxyClient,
    *,
    max_stow_bytes: int = DEFAULT_MAX_STOW_BYTES,
) -> APIRouter:
    """The DICOMweb proxy's routes under /dicom-web, forwarding to `pacs`.

    Mount it under the authenticating dependency (it reads the caller's `Access` from
    `request.state.access` or `current_access`, and refuses with 401 when neither is set) and with
    `install_error_handlers`, which turns the raised FhirErrors into OperationOutcomes. `pacs` is
    opened and closed by the caller's lifespan. Links in answers are rewritten from `pacs`'s base
    to `settings.dicomweb_proxy_url` (FACADE_BASE_URL's root + /dicom-web); `max_stow_bytes`
    bounds a STOW-RS body (413 above it).
    """
    if max_stow_bytes < 1:
        raise ValueError(f"max_stow_bytes must be positive, got {max_stow_bytes}")
    if not settings.dicomweb_proxy_url.endswith(PREFIX):
        raise ValueError(f"{settings.dicomweb_proxy_url!r} is not the proxy's root {PREFIX}")
    proxy = _Proxy(pacs, LinkRewriter(pacs.base_url, settings.dicomweb_proxy_url), max_stow_bytes)
    router = APIRouter(prefix=PREFIX)
    routes: list[tuple[str, str, Handler, tuple[str, ...]]] = [
        ("GET", "qido", proxy.search, QIDO_PATHS),
        ("GET", "wado", proxy.retrieve, WADO_PATHS),
        ("POST", "stow", proxy.store, STOW_PATHS),
    ]
    for method, kind, handler, templates in routes:
        for template in templates:
            extra = _OPENAPI[kind]
            router.add_api_route(
                template,
                proxy.endpoint(handler, template),
                methods=[method],
                name=f"dicomweb-{kind}:{template}",
                summary=f"{extra['summary']}: {template}",
                tags=[OPENAPI_TAG],
                response_class=Response,
                openapi_extra={
                    "parameters": [
                        {
                            "name": name,
                            "in": "path",
                            "required": True,
                            "description": about,
                            "schema": {"type": "string"},
                        }
                        for name, about in _PATH_PARAMETERS.items()
                        if f"{{{name}}}" in template or f"{{{name}:" in template
                    ],
                    **{k: v for k, v in extra.items() if k != "summary"},
                },
            )
    return router
