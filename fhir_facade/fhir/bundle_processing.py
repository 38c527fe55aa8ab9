"""`POST [base]` with a batch or transaction Bundle (FHIR R4 http.html#transaction).

Entries are dispatched to the same interaction functions as the REST routes. A transaction runs
inside `atomic()` (the store's database transaction): any failing entry rolls every entry back and
the whole request fails with that entry's OperationOutcome. Before anything is created,
`urn:uuid:` fullUrls of new resources get server ids and every reference to them is rewritten;
a conditional create (`ifNoneExist`) with such a fullUrl is searched first, and when it finds its
resource the references point there instead (http.html#trules).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fhir_facade.fhir.bundles import searchset_bundle
from fhir_facade.fhir.conditional_guard import ConditionalGuard, ConditionChanged, canonical_criteria
from fhir_facade.fhir.errors import FhirError, bad_request, conflict, not_supported
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.search import parse_search
from fhir_facade.fhir.settings import RestSettings
from fhir_facade.fhir.write_interactions import (
    Written,
    conditional_matches,
    conditionally_update,
    create_resource,
    criteria_params,
    single_match,
    update_resource,
    version_headers,
)

__all__ = ["Atomic", "process_bundle"]

Atomic = Callable[[], AbstractAsyncContextManager[None]]

#: A FHIR resource type name (R4 ResourceType codes): what a placeholder id may be minted for.
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]*")

# Processing order inside a transaction (http.html#trules): deletes, creates, updates, reads.
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}
#: A transaction whose conditional create lost a race to another request is run again this often
#: (the next run finds the other request's resource), then 409.
_TRANSACTION_ATTEMPTS = 5


def _rewrite_references(value: Any, ids: Mapping[str, str]) -> Any:
    """Replace every `reference` that names a placeholder fullUrl with its assigned Type/id."""
    if isinstance(value, dict):
        return {
            k: ids.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite_references(v, ids)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite_references(v, ids) for v in value]
    return value


def _entry_request(entry: dict[str, Any], index: int) -> tuple[str, str]:
    request = entry.get("request")
    if not isinstance(request, dict) or not request.get("method") or not request.get("url"):
        raise bad_request(
            f"Bundle.entry[{index}].request needs method and url", expression=f"Bundle.entry[{index}].request"
        )
    return str(request["method"]).upper(), str(request["url"])


class _EntryRunner:
    def __init__(self, providers: Mapping[str, ResourceProvider], settings: RestSettings) -> None:
        self.providers = providers
        self.settings = settings

    def _provider(self, type_name: str) -> ResourceProvider:
        provider = self.providers.get(type_name)
        if provider is None:
            raise not_supported(f"Resource type '{type_name}' is not supported by this server")
        return provider

    def _target(self, url: str) -> tuple[ResourceProvider, list[str], str]:
        """The provider, path segments and query of an entry's request.url."""
        split = urlsplit(url)
        path = split.path.strip("/")
        if split.scheme and url.startswith(self.settings.base_url):
            path = url[len(self.settings.base_url) :].split("?")[0].strip("/")
        segments = path.split("/")
        return self._provider(segments[0]), segments, split.query

    @staticmethod
    def _resource(entry: dict[str, Any], index: int, provider: ResourceProvider) -> dict[str, Any]:
        resource = entry.get("resource")
        if not isinstance(resource, dict) or resource.get("resourceType") != provider.resource_type:
            raise bad_request(
                f"Bundle.entry[{index}].resource must be a {provider.resource_type}",
                expression=f"Bundle.entry[{index}].resource",
            )
        return resource

    async def run(self, entry: dict[str, Any], index: int) -> dict[str, Any]:
        with origin_scope(Origin.BUNDLE_ENTRY):
            return await self._run(entry, index)

    async def _run(self, entry: dict[str, Any], index: int) -> dict[str, Any]:
        method, url = _entry_request(entry, index)
        request = entry["request"]
        provider, segments, query = self._target(url)
        if method == "GET":
            return await self._get(provider, segments, query)
        if method == "DELETE" and len(segments) == 2:
            await provider.delete(segments[1])
            return {"response": {"status": "204 No Content"}}
        resource = self._resource(entry, index, provider)
        if method == "POST" and len(segments) == 1:
            written = await create_resource(provider, resource, request.get("ifNoneExist"), self.settings)
        elif method == "PUT" and len(segments) == 2:
            written = await update_resource(provider, segments[1], resource, request.get("ifMatch"))
        elif method == "PUT" and len(segments) == 1 and query:
            written = await conditionally_update(
                provider, query, resource, request.get("ifMatch"), self.settings
            )
        else:
            raise bad_request(
                f"Bundle.entry[{index}]: {method} {url} is not a supported interaction",
                expression=f"Bundle.entry[{index}].request",
            )
        return self._written_entry(written)

    async def find_conditional_create(
        self, entry: dict[str, Any], index: int
    ) -> tuple[ConditionalGuard, dict[str, Any] | None]:
        """The search of a conditional create (`ifNoneExist`, http.html#ccreate) that runs as an
        update-as-create under its placeholder's id: its guard, and the one match or None."""
        _, url = _entry_request(entry, index)
        provider, _, _ = self._target(url)
        self._resource(entry, index, provider)
        params = criteria_params(
            str(entry["request"]["ifNoneExist"]), f"Bundle.entry[{index}].request.ifNoneExist"
        )
        guard = ConditionalGuard(provider.resource_type, canonical_criteria(params))
        with guard.searching(), origin_scope(Origin.BUNDLE_ENTRY):
            matches = await conditional_matches(provider, params, self.settings)
        return guard, single_match(matches, "If-None-Exist")

    def existing_entry(self, resource: dict[str, Any]) -> dict[str, Any]:
        """The response entry of a conditional create that found its resource (200)."""
        return self._written_entry(Written(resource, 200, location=False))

    async def _get(self, provider: ResourceProvider, segments: list[str], query: str) -> dict[str, Any]:
        if len(segments) == 2:
            resource = await provider.read(segments[1])
            return {"resource": resource, "response": {"status": "200 OK"}}
        if len(segments) == 1:
            search = parse_search(
                provider.resource_type,
                parse_qsl(query, keep_blank_values=True),
                provider.search_param_map,
                base_url=self.settings.base_url,
                strict=False,
                default_count=self.settings.default_page_size,
                max_count=self.settings.max_page_size,
            )
            result = await provider.search(search)
            bundle = searchset_bundle(self.settings.base_url, search, result)
            return {"resource": bundle, "response": {"status": "200 OK"}}
        raise bad_request(f"GET {'/'.join(segments)} is not supported in a Bundle")

    def _written_entry(self, written: Written) -> dict[str, Any]:
        headers = version_headers(written.resource, self.settings.base_url, location=True)
        response: dict[str, Any] = {
            "status": f"{written.status} {'Created' if written.status == 201 else 'OK'}"
        }
        if "Location" in headers:
            response["location"] = headers["Location"]
        if "ETag" in headers:
            response["etag"] = headers["ETag"]
        if written.resource.get("meta", {}).get("lastUpdated"):
            response["lastModified"] = written.resource["meta"]["lastUpdated"]
        if written.warnings:  # Bundle.entry.response.outcome: hints and warnings (bundle.html)
            response["outcome"] = {
                "resourceType": "OperationOutcome",
                "issue": [issue.to_fhir() for issue in written.warnings],
            }
        return {"resource": written.resource, "response": response}


def _assign_placeholder_ids(entries: list[dict[str, Any]]) -> dict[str, str]:
    """urn:uuid fullUrl -> Type/new-id for entries that create resources (http.html#trules)."""
    ids: dict[str, str] = {}
    for entry in entries:
        full_url = entry.get("fullUrl")
        resource = entry.get("resource")
        request = entry.get("request")
        # Only well-formed creates get an id; a malformed entry is refused (400) when it is run.
        method = str(request.get("method", "")).upper() if isinstance(request, dict) else ""
        placeholder = isinstance(full_url, str) and full_url.startswith("urn:uuid:")
        type_name = resource.get("resourceType") if isinstance(resource, dict) else None
        if (
            placeholder
            and method == "POST"
            and isinstance(type_name, str)
            and _TYPE_NAME.fullmatch(type_name)
        ):
            ids[str(full_url)] = f"{type_name}/{uuid.uuid4().hex}"
    return ids


def _placeholder(entry: dict[str, Any], ids: Mapping[str, str]) -> str | None:
    """The entry's fullUrl when it is a placeholder that `_assign_placeholder_ids` gave an id (only
    creates get one)."""
    full_url = entry.get("fullUrl")
    return full_url if isinstance(full_url, str) and full_url in ids else None


async def process_bundle(
    bundle: dict[str, Any],
    providers: Mapping[str, ResourceProvider],
    settings: RestSettings,
    atomic: Atomic | None,
) -> dict[str, Any]:
    """Process a batch or transaction and return the batch-response / transaction-response. Every entry
    is an interaction of its own in the pipeline (origin BUNDLE_ENTRY, set by `_EntryRunner`)."""
    kind = bundle.get("type")
    if bundle.get("resourceType") != "Bundle" or kind not in ("batch", "transaction"):
        raise bad_request("POST [base] takes a Bundle of type batch or transaction", expression="Bundle.type")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad_request("Bundle.entry must be a list of entries", expression="Bundle.entry")
    runner = _EntryRunner(providers, settings)
    if kind == "batch":
        responses = []
        for index, entry in enumerate(entries):
            try:
                responses.append(await runner.run(entry, index))
            except FhirError as error:
                responses.append(
                    {"response": {"status": str(error.status), "outcome": error.operation_outcome()}}
                )
        return {"resourceType": "Bundle", "type": "batch-response", "entry": responses}

    if atomic is None:
        raise not_supported("Transactions need the persistent store", status=501)
    for index, entry in enumerate(entries):
        _entry_request(entry, index)  # a malformed entry fails the request before any write
    for _ in range(_TRANSACTION_ATTEMPTS):
        try:
            results = await _run_transaction(entries, runner, atomic)
        except ConditionChanged:
            continue  # rolled back: a conditional create's match appeared meanwhile; look again
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": results}
    raise conflict(
        f"The transaction's conditional creates kept finding new matches; it was tried "
        f"{_TRANSACTION_ATTEMPTS} times. Retry it."
    )


async def _run_transaction(
    entries: list[dict[str, Any]], runner: _EntryRunner, atomic: Atomic
) -> list[dict[str, Any]]:
    """One run of a transaction, in processing order (http.html#trules): deletes; then the searches
    of conditional creates with placeholder fullUrls, so that every reference is rewritten to the
    resource each one found or will create; then creates, updates and reads. A conditional create
    whose match appeared after its search raises ConditionChanged (everything rolls back)."""
    ids = _assign_placeholder_ids(entries)
    methods = [_entry_request(entry, index)[0] for index, entry in enumerate(entries)]
    order = sorted(range(len(entries)), key=lambda i: (_ORDER.get(methods[i], 9), i))
    results: dict[int, dict[str, Any]] = {}
    guards: dict[int, ConditionalGuard] = {}
    async with atomic():
        for index in (i for i in order if methods[i] == "DELETE"):
            results[index] = await runner.run(_rewrite_references(entries[index], ids), index)
        for index in order:
            full_url = _placeholder(entries[index], ids)
            if full_url is None or not entries[index]["request"].get("ifNoneExist"):
                continue
            guard, existing = await runner.find_conditional_create(entries[index], index)
            if existing is None:
                guards[index] = guard
            else:
                ids[full_url] = f"{existing['resourceType']}/{existing['id']}"
                results[index] = runner.existing_entry(existing)
        for index in order:
            if index in results:
                continue
            entry = _rewrite_references(entries[index], ids)
            full_url = _placeholder(entries[index], ids)
            # A create with a placeholder becomes a create under the assigned id (update-as-create),
            # so references to it could be rewritten before any write.
            if full_url is not None:
                type_name, new_id = ids[full_url].split("/")
                entry = {
                    **entry,
                    "resource": {**entry["resource"], "id": new_id},
                    "request": {**entry["request"], "method": "PUT", "url": f"{type_name}/{new_id}"},
                }
            if index in guards:
                with guards[index].writing():
                    results[index] = await runner.run(entry, index)
            else:
                results[index] = await runner.run(entry, index)
    return [results[i] for i in range(len(entries))]
