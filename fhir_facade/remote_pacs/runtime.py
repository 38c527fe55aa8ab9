"""Wiring and HTTP surface of query/retrieve from remote DICOM nodes (ADR 0041).

- `GET|POST /fhir/ImagingStudy/$query-remote?node=NAME&<ImagingStudy search parameters>`:
  a searchset Bundle of the node's studies (C-FIND), each saying where it lives.
- `POST /fhir/ImagingStudy/$retrieve-remote` (Parameters `node`, `study` = Study Instance UID):
  202 + Content-Location of the job and `X-Retrieve-Task: Task/<id>`.
- `GET /fhir/$retrieve-jobs/{task id}`: 202 with X-Progress and Retry-After while it runs, then 200
  with a batch-response Bundle holding the local ImagingStudy, or the failure's OperationOutcome.

Node names are only those of FACADE_REMOTE_PACS_NODES; another name is a 400 (no free host or port).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from fhir_facade.dicom_to_fhir import MappingContext
from fhir_facade.embedded.remote_nodes import RemoteNode
from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.errors import bad_request, error, not_found
from fhir_facade.fhir.negotiation import negotiate_response_format
from fhir_facade.fhir.openapi import error_responses
from fhir_facade.fhir.pipeline import Origin, Pipeline, PipelinedProvider, enter_origin
from fhir_facade.fhir.request_body import read_resource
from fhir_facade.fhir.responses import fhir_response
from fhir_facade.fhir.search import parse_search
from fhir_facade.remote_pacs.nodes import node_endpoint
from fhir_facade.remote_pacs.orthanc_dimse import OrthancDimse
from fhir_facade.remote_pacs.retrieve import RetrieveJobs
from fhir_facade.remote_pacs.search import RemoteStudies

__all__ = ["JOBS_PATH", "OPERATIONS", "RemotePacsRuntime"]

JOBS_PATH = "$retrieve-jobs"
OPERATIONS = [
    {"name": "query-remote", "definition": "http://fhir-facade.org/fhir/OperationDefinition/query-remote"},
    {
        "name": "retrieve-remote",
        "definition": "http://fhir-facade.org/fhir/OperationDefinition/retrieve-remote",
    },
]
_JSON: dict[str, dict[str, Any]] = {"application/fhir+json": {}}
_MAX_COUNT = 100


async def _as_operation() -> None:
    enter_origin(Origin.OPERATION)


class RemotePacsRuntime:
    """The configured nodes, their search providers and the retrieve jobs."""

    def __init__(
        self,
        nodes: Sequence[RemoteNode],
        dimse: OrthancDimse,
        ctx: MappingContext,
        *,
        local_aet: str,
        base_url: str,
    ) -> None:
        self.nodes = {node.name: node for node in nodes}
        self._dimse = dimse
        self._ctx = ctx
        self._local_aet = local_aet
        self._base_url = base_url
        self._studies: dict[str, PipelinedProvider] = {}
        self._jobs: RetrieveJobs | None = None

    @property
    def operations(self) -> list[dict[str, str]]:
        """The CapabilityStatement's ImagingStudy operations (declared only when nodes are set)."""
        return list(OPERATIONS)

    @property
    def endpoints(self) -> list[dict[str, Any]]:
        """The nodes' Endpoints, served with the local ones (the `endpoint` of remote studies)."""
        return [node_endpoint(node) for node in self.nodes.values()]

    def bind(self, pipeline: Pipeline, tasks: PipelinedProvider, studies: PipelinedProvider) -> APIRouter:
        """The routes, reading through the authorizing providers of `pipeline` (ADR 0009)."""
        for name, node in self.nodes.items():
            self._studies[name] = pipeline.wrap([RemoteStudies(node, self._dimse, self._ctx)])[0]
        self._jobs = RetrieveJobs(self._dimse, tasks, local_aet=self._local_aet)
        return self._router(studies)

    async def stop(self) -> None:
        if self._jobs is not None:
            await self._jobs.stop()

    def _node(self, name: str | None) -> RemoteNode:
        if not name:
            raise bad_request(
                "The parameter 'node' (a configured remote node) is required", expression="node"
            )
        node = self.nodes.get(name)
        if node is None:
            raise bad_request(
                f"{name!r} is not a configured remote DICOM node (FACADE_REMOTE_PACS_NODES)",
                expression="node",
                code="not-found",
            )
        return node

    async def _search(self, node: RemoteNode, params: list[tuple[str, str]]) -> SearchResult:
        provider = self._studies[node.name]
        request = parse_search(
            "ImagingStudy",
            params,
            provider.search_param_map,
            base_url=self._base_url,
            strict=True,
            default_count=_MAX_COUNT,
            max_count=_MAX_COUNT,
        )
        return await provider.search(request)

    def _router(self, local_studies: PipelinedProvider) -> APIRouter:
        router = APIRouter(prefix="/fhir", dependencies=[Depends(_as_operation)])
        jobs = self._jobs
        assert jobs is not None

        async def query_remote(request: Request) -> Response:
            negotiate_response_format(request)
            params = list(request.query_params.multi_items())
            if request.method == "POST" and await request.body():
                body = await read_resource(request, "Parameters")
                params += [
                    (p["name"], str(_value(p))) for p in body.get("parameter", []) if _value(p) is not None
                ]
            node = self._node(next((v for k, v in params if k == "node"), None))
            rest = [(k, v) for k, v in params if k not in ("node", "_format")]
            result = await self._search(node, rest)
            bundle = {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(result.matches) if result.total is None else result.total,
                "link": [{"relation": "self", "url": str(request.url)}],
                "entry": [
                    {"fullUrl": f"urn:uuid:{study['id']}", "resource": study, "search": {"mode": "match"}}
                    for study in result.matches
                ],
            }
            if result.total is None:
                del bundle["total"]
            return fhir_response(bundle, request)

        async def retrieve_remote(request: Request) -> Response:
            negotiate_response_format(request)
            body = await read_resource(request, "Parameters")
            values = {p.get("name"): _value(p) for p in body.get("parameter", [])}
            unknown = set(values) - {"node", "study"}
            if unknown:
                raise bad_request(
                    f"$retrieve-remote has no parameter {sorted(unknown)[0]!r} (it takes node, study)"
                )
            node = self._node(str(values.get("node") or ""))
            uid = str(values.get("study") or "").removeprefix("urn:oid:")
            if not uid or not all(part.isdigit() for part in uid.split(".")) or len(uid) > 64:
                raise bad_request("The parameter 'study' must be a Study Instance UID", expression="study")
            found = await self._search(node, [("identifier", f"urn:dicom:uid|urn:oid:{uid}")])
            if not found.matches:  # not there, or not the caller's: alike (ADR 0009)
                raise not_found(f"No study {uid} on {node.name}")
            task_id = await jobs.start(node, found.matches[0], uid)
            return Response(
                status_code=202,
                headers={
                    "Content-Location": f"{self._base_url}/{JOBS_PATH}/{task_id}",
                    "X-Retrieve-Task": f"Task/{task_id}",
                },
            )

        async def job_status(request: Request, task_id: str) -> Response:
            negotiate_response_format(request)
            state = await jobs.state(task_id)
            if state.running:
                return Response(
                    status_code=202, headers={"X-Progress": state.progress or "requested", "Retry-After": "1"}
                )
            if state.failure is not None:
                raise error(502, "exception", f"The retrieve failed: {state.failure}")
            assert state.study_uid is not None
            study = await local_studies.read(state.study_uid)
            bundle = {
                "resourceType": "Bundle",
                "type": "batch-response",
                "entry": [
                    {
                        "fullUrl": f"{self._base_url}/ImagingStudy/{study['id']}",
                        "resource": study,
                        "response": {"status": "200 OK", "location": f"ImagingStudy/{study['id']}"},
                    }
                ],
            }
            return fhir_response(bundle, request)

        for method in ("GET", "POST"):
            router.add_api_route(
                "/ImagingStudy/$query-remote",
                query_remote,
                methods=[method],
                summary="Search a remote DICOM node (operations/OperationDefinition-query-remote.json)",
                responses={200: {"content": _JSON}, **error_responses(400, 403)},
            )
        router.add_api_route(
            "/ImagingStudy/$retrieve-remote",
            retrieve_remote,
            methods=["POST"],
            summary="Retrieve a remote study (operations/OperationDefinition-retrieve-remote.json)",
            openapi_extra={"requestBody": {"required": True, "content": _JSON}},
            responses={
                202: {"description": "accepted; poll Content-Location"},
                **error_responses(400, 403, 404),
            },
        )
        router.add_api_route(
            f"/{JOBS_PATH}/{{task_id}}",
            job_status,
            methods=["GET"],
            summary="Status of a $retrieve-remote",
            responses={
                200: {"content": _JSON},
                202: {"description": "still running"},
                **error_responses(404),
            },
        )
        return router


def _value(parameter: dict[str, Any]) -> Any:
    return next((v for k, v in parameter.items() if k.startswith("value")), None)
