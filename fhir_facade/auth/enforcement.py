"""Scope enforcement and patient confinement: the authorization stage of the interaction pipeline.

``AuthorizationStage`` is the first stage every interaction passes (fhir_facade/fhir/pipeline); its
``TypeAuthorizer`` for the interaction's type lets it through only as far as the caller's Access
(``current_access``) allows it:

- the SMART permission for the interaction must be granted (403 insufficient_scope otherwise);
- when only `patient/` scopes grant it, the request is confined to the token's patient: searches get
  the compartment's search parameter added (so the PACS or the store never returns another patient's
  data), every result and every read is checked against the compartment again, and a resource
  outside it reads as 404 (its existence is not revealed);
- a v2 scope narrowed by a query (``patient/Observation.rs?category=laboratory``) is applied the same
  way: one narrowing is added to the search; several are checked per resource with an `_id` search.

- a confined caller may only write references to resources it can see (a Task's focus, output and
  basedOn are what the analysis worklist acts on), and every "not there", "deleted" and "not yours"
  answers alike (404), so nothing about other patients' resources can be learnt from the errors.

The router, Bundle entries, `_include`/`_revinclude`, `$analyze` and its jobs, and the analysis worklist
(which runs a Task with the rights of the client that requested it) all reach providers through the
pipeline, so they share one set of checks (docs/adr/0009-one-authorization-point.md lists every path).
An interaction with no caller passes only when the server itself does it (origin INTERNAL: arrival
Tasks, the worklist's scheduling Tasks); any other path without a caller fails closed (401).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from fhir_facade.auth.access import Confinement, authenticated_caller
from fhir_facade.auth.author_only import AuthorOnly
from fhir_facade.auth.compartment import (
    compartment_rule,
    local_references,
    patient_references,
    references_at,
)
from fhir_facade.auth.errors import forbidden
from fhir_facade.auth.scopes import Interaction, Query
from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.errors import FhirError, not_found, unprocessable
from fhir_facade.fhir.internal_search import SearchBuilder
from fhir_facade.fhir.pipeline import (
    Call,
    Create,
    Delete,
    History,
    InteractionContext,
    Origin,
    Proceed,
    Read,
    Search,
    Update,
    Vread,
)
from fhir_facade.fhir.provider import ResourceProvider, WriteResult
from fhir_facade.fhir.references import local_target
from fhir_facade.fhir.registry import registry
from fhir_facade.fhir.search import SearchRequest, parse_search

__all__ = ["AuthorizationStage", "TypeAuthorizer"]

log = logging.getLogger(__name__)


class TypeAuthorizer:
    """The decisions for one resource type: what the current caller may see and do with it.

    `inner` is the type's own provider; the authorizer reads through it on the server's authority
    (the current version before a write, Provenance targets), never through the pipeline.
    """

    def __init__(self, inner: ResourceProvider, peers: Mapping[str, ResourceProvider], base_url: str) -> None:
        self.inner = inner
        self._peers = peers  # the unwrapped providers, for Provenance targets and referenced resources
        #: Every type's authorizer (filled by `AuthorizationStage`), for write references.
        self.authorizing_peers: Mapping[str, TypeAuthorizer] = {}
        self._base_url = base_url
        self._rule = compartment_rule(inner.resource_type)
        self.resource_type = inner.resource_type

    # -- decisions -------------------------------------------------------------------------------

    def _grant(self, interaction: Interaction) -> tuple[Confinement, list[Query]]:
        """Check the permission; return (patients to confine to or None, narrowing queries)."""
        access = authenticated_caller()
        access.require(interaction, self.resource_type)
        if not access.enforced:
            return None, []
        # A type that holds no patient data here is granted unconfined by a patient/ scope.
        patients = access.confinement(interaction, self.resource_type) if self._rule else None
        granting = access.scopes.granting(interaction, self.resource_type)
        # user/ or system/ grants decide; patient/ ones would only narrow
        granting = tuple(s for s in granting if s.context != "patient") or granting
        if any(not s.query for s in granting):
            return patients, []
        return patients, list(dict.fromkeys(s.query for s in granting))

    def _unknown(self, resource_id: str) -> FhirError:
        """The one answer a confined caller gets for a resource that is not there, deleted, or not theirs:
        they must not be told apart (an existence oracle on other patients' data)."""
        return not_found(f"{self.resource_type}/{resource_id} is not known")

    async def _belongs(
        self,
        resource: dict[str, Any],
        patients: frozenset[str],
        targets: Mapping[str, dict[str, Any]] | None = None,
    ) -> bool:
        """Whether a caller confined to `patients` may see `resource`: it is in one of their
        compartments, or it is one that holds no patient data (an algorithm Device). `targets`:
        Provenance targets fetched already."""
        rule = self._rule
        assert rule is not None
        if rule.unreferenced_is_shared and not references_at(resource, rule.elements):
            return True
        return await self._owned(resource, patients, targets)

    async def _owned(
        self,
        resource: dict[str, Any],
        patients: frozenset[str],
        targets: Mapping[str, dict[str, Any]] | None = None,
    ) -> bool:
        """Whether `resource` is in `patient`'s compartment. Writes need this, not mere visibility: a
        shared resource (an algorithm Device every patient's reports cite) is outside every patient's
        compartment, so a `patient/` scope may read it but not create, change or delete it."""
        rule = self._rule
        assert rule is not None
        if self.resource_type == "Patient":
            return resource.get("id") in patients
        if rule.via_targets:
            known = targets if targets is not None else await self._targets_of([resource])
            return self._targets_belong(resource, patients, known)
        return not patients.isdisjoint(patient_references(resource, rule, self._base_url))

    async def _belonging(
        self, resources: list[dict[str, Any]], patients: frozenset[str]
    ) -> list[dict[str, Any]]:
        """The resources `patient` may see, judged together: the targets of a page of Provenances are
        fetched with one `_id` search per target type, not one read per target."""
        assert self._rule is not None
        targets = await self._targets_of(resources) if self._rule.via_targets else {}
        return [r for r in resources if await self._belongs(r, patients, targets)]

    def _patient_specific_targets(self, resource: dict[str, Any]) -> list[tuple[str, str]]:
        """(type, id) of the targets that hold patient data (and whose type this server serves)."""
        found = []
        for reference in references_at(resource, ("target",)):
            target = local_target(reference, self._base_url)
            if target is None:
                continue
            kind, target_id = target
            rule = compartment_rule(kind)
            if rule is not None and not rule.via_targets and kind in self._peers:
                found.append((kind, target_id))
        return found

    async def _targets_of(self, resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The patient-specific targets of `resources`, by "Type/id", read on the server's authority."""
        wanted: dict[str, set[str]] = {}
        for resource in resources:
            for kind, target_id in self._patient_specific_targets(resource):
                wanted.setdefault(kind, set()).add(target_id)
        return await self._fetch_by_ids(wanted)

    async def _fetch_by_ids(self, wanted: Mapping[str, set[str]]) -> dict[str, dict[str, Any]]:
        """The current resources named in `wanted` (type -> ids), by "Type/id", with one `_id` search per
        type on the unwrapped providers (the server's authority), run together. A resource that does
        not exist or is deleted is simply absent."""

        async def fetch(kind: str, ids: set[str]) -> list[dict[str, Any]]:
            peer = self._peers[kind]
            try:
                request = (
                    SearchBuilder(peer, base_url=self._base_url)
                    .where_any("_id", sorted(ids))
                    .count(len(ids))
                    .request()
                )
            except FhirError:  # an id no search can name: such resources stay unknown
                return []
            return (await peer.search(request)).matches

        found = await asyncio.gather(*(fetch(kind, ids) for kind, ids in wanted.items()))
        return {f"{m['resourceType']}/{m['id']}": m for batch in found for m in batch}

    def _targets_belong(
        self, resource: dict[str, Any], patients: frozenset[str], targets: Mapping[str, dict[str, Any]]
    ) -> bool:
        """A Provenance is the patients' when every patient-specific target is, and one at least."""
        specific = self._patient_specific_targets(resource)
        for kind, target_id in specific:
            target = targets.get(f"{kind}/{target_id}")
            if target is None:
                return False
            rule = compartment_rule(kind)
            assert rule is not None
            if kind == "Patient":
                ok = target.get("id") in patients
            else:
                ok = not patients.isdisjoint(patient_references(target, rule, self._base_url))
            if not ok:
                return False
        return bool(specific)

    async def _matches_narrowing(self, ids: Sequence[str], queries: list[Query]) -> set[str]:
        """The ids among `ids` that match at least one narrowing query (one `_id` search each)."""
        if not queries or not ids:
            return set(ids)
        searches = [self._search_inner([("_id", ",".join(ids)), *query], len(ids)) for query in queries]
        allowed: set[str] = set()
        for result in await asyncio.gather(*searches):
            allowed |= {m["id"] for m in result.matches}
        return allowed

    async def _search_inner(self, params: list[tuple[str, str]], count: int) -> SearchResult:
        request = self._parse(params, count)
        return await self.inner.search(request)

    def _parse(self, params: Sequence[tuple[str, str]], count: int = 1) -> SearchRequest:
        try:
            return parse_search(
                self.resource_type,
                params,
                self.inner.search_param_map,
                base_url=self._base_url,
                strict=True,
                default_count=max(count, 1),
                max_count=max(count, 1),
            )
        except FhirError as error:
            raise forbidden(
                f"The access token's scope narrows {self.resource_type} by a search this server cannot "
                f"apply: {error}"
            ) from error

    async def _visible(self, resource: dict[str, Any], patients: Confinement, queries: list[Query]) -> bool:
        if patients is not None and not await self._belongs(resource, patients):
            return False
        return not queries or resource["id"] in await self._matches_narrowing([resource["id"]], queries)

    async def _check_visible(
        self, resource: dict[str, Any], patients: Confinement, queries: list[Query]
    ) -> None:
        if not await self._visible(resource, patients, queries):
            log.info(
                "Refused %s/%s to %s: outside its grant",
                self.resource_type,
                resource.get("id"),
                authenticated_caller().who,
            )
            raise self._unknown(str(resource.get("id")))

    async def _restricted_read(
        self, resource_id: str, patients: Confinement, queries: list[Query], read: Proceed
    ) -> dict[str, Any]:
        """`read()`; for a restricted caller "not there" and "deleted" answer like "not yours"."""
        try:
            return await read()
        except FhirError as error:
            if (patients is not None or queries) and error.status in (404, 410):
                raise self._unknown(resource_id) from None
            raise

    # -- interactions: each runs `proceed` (the rest of the pipeline) when the caller may ---------------

    async def read(self, resource_id: str, proceed: Proceed) -> dict[str, Any]:
        patients, queries = self._grant(Interaction.READ)
        resource = await self._restricted_read(resource_id, patients, queries, proceed)
        await self._check_visible(resource, patients, queries)
        return resource

    async def vread(self, resource_id: str, proceed: Proceed) -> dict[str, Any]:
        patients, queries = self._grant(Interaction.READ)
        if queries:
            current = await self._restricted_read(
                resource_id, patients, queries, lambda: self.inner.read(resource_id)
            )
            await self._check_visible(current, None, queries)
        resource = await self._restricted_read(resource_id, patients, [], proceed)
        await self._check_visible(resource, patients, [])
        return resource

    async def search(self, request: SearchRequest, proceed: Proceed) -> SearchResult:
        patients, queries = self._grant(Interaction.SEARCH)
        if patients is not None and not patients:
            return SearchResult([], 0, False)  # a user with no patients: nothing to find, nothing to ask
        if patients is not None and self._rule is not None and self._rule.search_param:
            request.clauses += self._parse(
                [(self._rule.search_param, self._confining_value(patients))]
            ).clauses
        if len(queries) == 1:
            request.clauses += self._parse(list(queries[0])).clauses
            queries = []
        result: SearchResult = await proceed()  # runs the narrowed `request`
        if patients is None and not queries:
            return result
        allowed = await self._matches_narrowing([m["id"] for m in result.matches], queries)
        kept = [m for m in result.matches if m["id"] in allowed]
        if patients is not None:
            kept = await self._belonging(kept, patients)
        if queries or (patients is not None and not self._confined_by_search()):
            # Filtered after the search: the inner total counts what the caller may not see (also on
            # an empty `_summary=count` page, where nothing was filtered), so none is given.
            result.total = None
        result.matches = kept
        return result

    def _confined_by_search(self) -> bool:
        """Whether a confined search of this type is narrowed to the patient by the query itself (so the
        inner total is the patient's), rather than filtered afterwards."""
        return self._rule is not None and self._rule.search_param is not None

    def _confining_value(self, patients: frozenset[str]) -> str:
        """The confining parameter's value: the patients ORed (FHIR ids hold no commas)."""
        prefix = "" if self.resource_type == "Patient" else "Patient/"
        return ",".join(prefix + patient for patient in sorted(patients))

    async def create(self, resource: dict[str, Any], proceed: Proceed) -> dict[str, Any]:
        patients, queries = self._grant(Interaction.CREATE)
        self._refuse_narrowed_write(queries)
        if patients is not None:
            if not await self._owned(resource, patients):
                raise self._not_theirs("create")
            await self.check_references(resource, patients)
        return await proceed()

    async def update(self, call: Update, proceed: Proceed) -> WriteResult:
        """Update needs `u`; an update that creates the resource (update-as-create, and the creates of a
        transaction, which run as updates under server-assigned ids) needs `c` instead."""
        if not authenticated_caller().enforced:
            return await proceed()
        resource_id, resource = call.named_id, call.resource
        existing = await call.current()
        patients, queries = self._grant(Interaction.UPDATE if existing else Interaction.CREATE)
        self._refuse_narrowed_write(queries)
        if patients is not None:
            if existing is not None:
                await self._check_writable(existing, patients)
            else:
                await self._check_not_taken(resource_id, patients)
            if not await self._owned({**resource, "id": resource_id}, patients):
                raise self._not_theirs("write")
            await self.check_references(resource, patients)
        return await proceed()

    def _not_theirs(self, verb: str) -> FhirError:
        return forbidden(
            f"A patient-confined token may only {verb} {self.resource_type} for the patients it may access"
        )

    async def _check_not_taken(self, resource_id: str, patients: frozenset[str]) -> None:
        """An update-as-create may not revive a deleted resource that was another patient's: its id and
        history stay theirs. Answered like a resource the caller may not see."""
        previous = await self._last_content(resource_id)
        if previous is not None and not await self._belongs(previous, patients):
            log.info(
                "Refused to let %s take over the deleted %s/%s",
                authenticated_caller().who,
                self.resource_type,
                resource_id,
            )
            raise self._unknown(resource_id)

    async def check_references(self, resource: dict[str, Any], patients: frozenset[str]) -> None:
        """A caller confined to `patients` may only reference resources within them: otherwise a Task
        `for` its own patient could point the analysis worklist at another patient's study (focus) or
        hand out another patient's report (output). A reference to a resource that does not exist is
        refused the same way, so the answer tells nothing about other patients' data."""
        # Scopes are not asked: a write may reference what the writer could not read itself (a Task
        # `for` a Patient, written with Task scopes only), but nothing of another patient's.
        checked = [
            (path, kind, target_id)
            for path, (kind, target_id) in local_references(resource, self._base_url)
            if kind in self.authorizing_peers and compartment_rule(kind) is not None
        ]  # other types hold no patient data here (Endpoint, conformance artifacts)
        wanted: dict[str, set[str]] = {}
        for _, kind, target_id in checked:
            wanted.setdefault(kind, set()).add(target_id)
        found = await self._fetch_by_ids(wanted)
        for path, kind, target_id in checked:
            target = found.get(f"{kind}/{target_id}")
            if target is None or not await self.authorizing_peers[kind]._belongs(target, patients):
                log.info(
                    "Refused a %s write by %s referencing %s/%s at %s",
                    self.resource_type,
                    authenticated_caller().who,
                    kind,
                    target_id,
                    path,
                )
                raise unprocessable(
                    f"{path} refers to {kind}/{target_id}, which is not known",
                    detail_code="unknown_reference",
                )

    async def _check_writable(self, existing: dict[str, Any], patients: frozenset[str]) -> None:
        """404 for a resource the caller may not see; 403 for one it sees but does not own (shared)."""
        await self._check_visible(existing, patients, [])
        if not await self._owned(existing, patients):
            raise forbidden(
                f"{self.resource_type}/{existing.get('id')} holds no patient's data and is shared; "
                "a patient-confined token may not change it"
            )

    async def _existing(self, resource_id: str) -> dict[str, Any] | None:
        try:
            return await self.inner.read(resource_id)
        except FhirError as error:
            if error.status in (404, 410):
                return None
            raise

    async def delete(self, call: Delete, proceed: Proceed) -> None:
        patients, queries = self._grant(Interaction.DELETE)
        self._refuse_narrowed_write(queries)
        resource_id = call.named_id
        if patients is not None:
            existing = await call.current()
            if existing is not None:
                await self._check_writable(existing, patients)
            else:
                # Deleting what is gone is idempotent only for the caller's own resource; "never
                # existed" and "another patient's, deleted" answer like "another patient's" (404).
                previous = await self._last_content(resource_id)
                if previous is None or not await self._belongs(previous, patients):
                    raise self._unknown(resource_id)
        await proceed()

    def _refuse_narrowed_write(self, queries: list[Query]) -> None:
        if queries:
            raise forbidden(
                f"Write scopes narrowed by a query are not supported for {self.resource_type}; "
                "ask for an unnarrowed write scope"
            )

    async def history(self, resource_id: str | None, proceed: Proceed) -> tuple[list[dict[str, Any]], int]:
        interaction = Interaction.READ if resource_id else Interaction.SEARCH
        patients, queries = self._grant(interaction)
        if queries:
            raise forbidden(f"History of {self.resource_type} is not available to query-narrowed scopes")
        if patients is None:
            return await proceed()
        if resource_id is not None:
            return await self._instance_history(resource_id, patients, proceed)
        entries, _ = await proceed()
        kept = await self._belonging([e for e in entries if not e.get("_deleted")], patients)
        # The inner total counts every patient's versions (also on an empty `_count=0` page).
        return kept, len(kept)

    async def _instance_history(
        self, resource_id: str, patients: frozenset[str], proceed: Proceed
    ) -> tuple[list[dict[str, Any]], int]:
        """The versions of one resource that are the patient's, and its deletions.

        The resource is judged by its newest content (the current version, or for a deleted resource
        the version before the deletion): another patient's resource is 404 like a read. Each version
        is then judged by its own content, as vread does, so versions from before the resource moved
        to this patient stay hidden.
        """
        current = await self._existing(resource_id) or await self._last_content(resource_id)
        if current is None:
            raise self._unknown(resource_id)
        await self._check_visible(current, patients, [])
        entries, total = await proceed()
        visible = await self._belonging([e for e in entries if not e.get("_deleted")], patients)
        kept = [e for e in entries if e.get("_deleted") or any(e is v for v in visible)]
        return kept, total - (len(entries) - len(kept))

    async def _last_content(self, resource_id: str) -> dict[str, Any] | None:
        """The newest version that is not a deletion, of a resource that is deleted now (None for one
        that never existed, or for a type that keeps no history)."""
        try:
            entries, _ = await self.inner.history(resource_id, 2, 0)
        except FhirError as error:
            if error.status in (404, 405, 410):
                return None
            raise
        return next((e for e in entries if not e.get("_deleted")), None)


@runtime_checkable
class AuthoredProvider(Protocol):
    """A provider that knows who wrote each version (the SQL store's, ADR 0009)."""

    async def author_of(self, resource_id: str, version_id: str) -> str | None: ...


class AuthorizationStage:
    """The pipeline stage that decides, for every interaction, what its caller may see and do.

    An interaction without a caller is the server's own work and passes only when it says so (origin
    INTERNAL); anywhere else a missing caller fails closed (`authenticated_caller` answers 401).
    """

    def __init__(self, providers: Sequence[ResourceProvider], base_url: str) -> None:
        peers = {p.resource_type: p for p in providers}
        self.authorizers = {kind: TypeAuthorizer(p, peers, base_url) for kind, p in peers.items()}
        for authorizer in self.authorizers.values():
            authorizer.authorizing_peers = self.authorizers
        #: The types only their author may see (registry data), with the author lookup of their store.
        self.author_only = {
            kind: AuthorOnly(kind, provider.author_of)
            for kind, provider in peers.items()
            if (facts := registry().facts(kind)) is not None
            and facts.author_only
            and isinstance(provider, AuthoredProvider)
        }

    async def around(self, context: InteractionContext, call: Call, proceed: Proceed) -> Any:
        if context.caller is None and context.origin is Origin.INTERNAL:
            return await proceed()
        author_only = self.author_only.get(context.resource_type)
        if author_only is None:
            return await self._scoped(context, call, proceed)
        checked = author_only

        async def own_only() -> Any:
            """After the scope checks (a missing scope stays a 403), before the resource is touched."""
            match call:
                case Read() | Vread():
                    await checked.check(Interaction.READ, call.named_id)
                case History() if call.id is not None:
                    await checked.check(Interaction.READ, call.id)
                case Update() | Delete() if await call.current() is not None:
                    write = Interaction.UPDATE if isinstance(call, Update) else Interaction.DELETE
                    await checked.check(write, call.named_id)
            return await proceed()

        result = await self._scoped(context, call, own_only)
        match call:
            case Search():
                return await author_only.filter_search(result)
            case History() if call.id is None:
                return await author_only.filter_history(*result)
        return result

    async def _scoped(self, context: InteractionContext, call: Call, proceed: Proceed) -> Any:
        """The scope and compartment decisions of the interaction's type."""
        authorizer = self.authorizers[context.resource_type]
        match call:
            case Read():
                return await authorizer.read(call.named_id, proceed)
            case Vread():
                return await authorizer.vread(call.named_id, proceed)
            case Search(request=request) if request is not None:
                return await authorizer.search(request, proceed)
            case History():
                return await authorizer.history(call.id, proceed)
            case Create():
                return await authorizer.create(call.resource, proceed)
            case Update():
                return await authorizer.update(call, proceed)
            case Delete():
                return await authorizer.delete(call, proceed)
        raise TypeError(f"No authorization rule for {type(call).__name__}")  # a new Call type needs one

    async def check_references(
        self, resource_type: str, resource: dict[str, Any], patients: frozenset[str]
    ) -> None:
        """Refuse `resource` (of `resource_type`) if it references anything outside `patients`: what a
        job acting for a confined client checks before acting on a Task (analyze/jobs.py)."""
        await self.authorizers[resource_type].check_references(resource, patients)
