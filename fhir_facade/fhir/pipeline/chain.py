"""The pipeline: ordered stages around every interaction, and the events published after writes.

`Pipeline.wrap(providers)` gives the view of the providers every caller-facing path uses (the REST
router, Bundle entries, `_include`, operations, jobs acting for a client, the server's own writes
that others must hear of). Each interaction on that view is described once (`InteractionContext` and
a typed `Call`), passes every stage in order, reaches the provider, and a successful write publishes
one `ResourceChanged` on the bus, after the commit of the transaction it ran in.

A stage is HAPI's interceptor reduced to one method: `around(context, call, proceed)` may refuse
(raise a FhirError), change the call (narrow a search), call `proceed()` to run the rest of the chain,
and inspect or filter what comes back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from fhir_facade.correlation import current_correlation_id
from fhir_facade.fhir.bundles import SearchResult
from fhir_facade.fhir.pipeline.bus import EventBus
from fhir_facade.fhir.pipeline.calls import Call, Create, Delete, History, Read, Search, Update, Vread
from fhir_facade.fhir.pipeline.context import Caller, InteractionContext, current_origin
from fhir_facade.fhir.pipeline.events import ChangeKind, ResourceChanged
from fhir_facade.fhir.provider import ResourceProvider, WriteResult
from fhir_facade.fhir.search import SearchParamDef, SearchRequest

__all__ = ["Pipeline", "PipelinedProvider", "Proceed", "Stage"]

Proceed = Callable[[], Awaitable[Any]]


class Stage(Protocol):
    """One cross-cutting concern applied to every interaction (authorization, validation, audit)."""

    async def around(self, context: InteractionContext, call: Call, proceed: Proceed) -> Any: ...


class Pipeline:
    """The ordered stages, the bus, and how to learn who the current caller is."""

    def __init__(
        self,
        stages: Sequence[Stage],
        bus: EventBus,
        identify: Callable[[], Caller | None],
    ) -> None:
        self.stages = tuple(stages)
        self.bus = bus
        self._identify = identify

    def context(self, call: Call) -> InteractionContext:
        caller = self._identify()
        return InteractionContext(
            kind=call.kind,
            resource_type=call.provider.resource_type,
            resource_id=call.id,
            origin=current_origin(),
            caller=caller,
            patient=getattr(caller, "patient", None),
            correlation_id=current_correlation_id(),
        )

    async def run(self, call: Call, action: Proceed) -> Any:
        """Run `call` through every stage; `action` is the provider doing it, at the end."""
        context = self.context(call)

        def step(index: int) -> Proceed:
            if index == len(self.stages):
                return action

            async def proceed() -> Any:
                return await self.stages[index].around(context, call, step(index + 1))

            return proceed

        result = await step(0)()
        if call.kind.writes:
            await self._publish(context, call, result)
        return result

    async def _publish(self, context: InteractionContext, call: Call, result: Any) -> None:
        if not self.bus.subscribers(ResourceChanged):
            return
        before = await call.current() if isinstance(call, Update | Delete) else None
        if isinstance(call, Create):
            change, after = ChangeKind.CREATED, result
        elif isinstance(call, Update):
            assert isinstance(result, WriteResult)
            change = ChangeKind.CREATED if result.created else ChangeKind.UPDATED
            after = result.resource
        else:
            change, after = ChangeKind.DELETED, None
        resource_id = str((after or {}).get("id") or call.id)
        event = ResourceChanged(change, context.resource_type, resource_id, before, after, context)
        await self.bus.publish(event)

    def wrap(self, providers: Sequence[ResourceProvider]) -> list[PipelinedProvider]:
        return [PipelinedProvider(provider, self) for provider in providers]


class PipelinedProvider(ResourceProvider):
    """A provider whose every interaction goes through the pipeline (same declarations as `inner`)."""

    def __init__(self, inner: ResourceProvider, pipeline: Pipeline) -> None:
        self.inner = inner
        self._pipeline = pipeline
        self.resource_type = inner.resource_type  # type: ignore[misc]
        self.profile = inner.profile  # type: ignore[misc]
        self.documentation = inner.documentation  # type: ignore[misc]
        self.search_params = inner.search_params  # type: ignore[misc]
        self.sortable = inner.sortable  # type: ignore[misc]
        self.include_paths = inner.include_paths  # type: ignore[misc]
        self.capability_extensions = inner.capability_extensions  # type: ignore[misc]

    @property
    def interactions(self) -> tuple[str, ...]:
        return self.inner.interactions

    @property
    def search_param_map(self) -> dict[str, SearchParamDef]:
        return self.inner.search_param_map

    async def read(self, resource_id: str) -> dict[str, Any]:
        call = Read(self.inner, id=resource_id)
        return await self._pipeline.run(call, lambda: self.inner.read(resource_id))

    async def vread(self, resource_id: str, version_id: str) -> dict[str, Any]:
        call = Vread(self.inner, id=resource_id, version_id=version_id)
        result = await self._pipeline.run(call, lambda: self.inner.vread(resource_id, version_id))
        return result

    async def search(self, request: SearchRequest) -> SearchResult:
        call = Search(self.inner, request=request)
        return await self._pipeline.run(call, lambda: self.inner.search(request))

    async def history(
        self, resource_id: str | None, count: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        call = History(self.inner, id=resource_id, count=count, offset=offset)
        result = await self._pipeline.run(call, lambda: self.inner.history(resource_id, count, offset))
        return result

    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        call = Create(self.inner, resource=resource)
        return await self._pipeline.run(call, lambda: self.inner.create(resource))

    async def update(
        self, resource_id: str, resource: dict[str, Any], *, if_match: str | None
    ) -> WriteResult:
        call = Update(self.inner, id=resource_id, resource=resource, if_match=if_match)
        if self._pipeline.bus.subscribers(ResourceChanged):
            await call.current()  # the version before, for the event (and shared with every stage)
        action = lambda: self.inner.update(resource_id, resource, if_match=if_match)  # noqa: E731
        return await self._pipeline.run(call, action)

    async def delete(self, resource_id: str) -> None:
        call = Delete(self.inner, id=resource_id)
        if self._pipeline.bus.subscribers(ResourceChanged):
            await call.current()
        await self._pipeline.run(call, lambda: self.inner.delete(resource_id))
