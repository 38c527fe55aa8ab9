"""The FastAPI application: wiring of settings, PACS client, providers and the FHIR router."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from fhir_facade import __version__
from fhir_facade.analyze.runtime import AnalyzeRuntime
from fhir_facade.api_docs import install_api_docs
from fhir_facade.audit import audit_recorder, audit_stage, install_audit
from fhir_facade.audit.refusals import AuthenticationAudit
from fhir_facade.auth.access import current_access
from fhir_facade.auth.dependency import Authenticator, BearerScheme, bearer_validator
from fhir_facade.auth.discovery import AuthorizationEndpoints, build_discovery_router, capability_security
from fhir_facade.auth.enforcement import AuthorizationStage
from fhir_facade.auth.operations import analyze_guard, server_admin_guard
from fhir_facade.auth.tokens import StaticKeys
from fhir_facade.config import Settings
from fhir_facade.correlation import install_correlation
from fhir_facade.demo.brain_mri import DEMO_STUDY_UID
from fhir_facade.dicom_to_fhir import MappingContext
from fhir_facade.dicomweb import DicomwebClient
from fhir_facade.dicomweb.orthanc_rest import OrthancRestClient
from fhir_facade.dicomweb.outcomes import PACS_ERROR_TRANSLATORS
from fhir_facade.dicomweb_proxy import DicomwebProxyClient, build_dicomweb_proxy_router
from fhir_facade.fhir.internal_search import SearchBuilder, read_or_none
from fhir_facade.fhir.openapi import install_openapi
from fhir_facade.fhir.pipeline import EventBus, Origin, Pipeline, PipelinedProvider, Stage, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.fhir.responses import install_error_handlers
from fhir_facade.fhir.router import build_fhir_router
from fhir_facade.http_limits import BodyLimits, RequestLimitsMiddleware
from fhir_facade.intake.deidentify_runtime import deidentify_runtime
from fhir_facade.intake.import_endpoint import ImportService
from fhir_facade.intake.reconcile_runtime import ReconcileRuntime
from fhir_facade.intake.study_delete import StudyDeletion
from fhir_facade.metrics import metrics_router
from fhir_facade.reading import ReadingRuntime
from fhir_facade.remote_pacs import RemotePacsRuntime, parse_remote_node
from fhir_facade.remote_pacs.orthanc_dimse import OrthancDimse
from fhir_facade.resources.artifacts import artifact_providers
from fhir_facade.resources.endpoint import EndpointProvider
from fhir_facade.resources.imaging_study import ImagingStudyProvider, OrdersByAccession
from fhir_facade.resources.order_worklist import OrderWorklist
from fhir_facade.resources.patient import PatientProvider
from fhir_facade.resources.stored import StoredResourceProvider, stored_providers
from fhir_facade.store import ResourceStore, create_store_engine, upgrade
from fhir_facade.store.atomic import atomic_scope
from fhir_facade.store.expiring import ExpiringEntries
from fhir_facade.store.feed_position import SqlFeedPositionStore
from fhir_facade.store.leases import Leases
from fhir_facade.subscriptions import SubscriptionRuntime
from fhir_facade.sync.outbox_queue import OutboxQueue
from fhir_facade.sync.runtime import SyncRuntime
from fhir_facade.sync.unconfigured import build_unconfigured_sync_router
from fhir_facade.watcher import StudyArrivalWatcher, TaskRule
from fhir_facade.watcher.arrival_tasks import ArrivalTaskCreator
from fhir_facade.watcher.change_feed import StudyArrived
from fhir_facade.watcher.election import ElectedWatcher
from fhir_facade.web_app import imaging_app_client, install_web_app
from fhir_facade.worklist import WorklistFolder, bundled_catalogue

__all__ = ["create_app"]

log = logging.getLogger(__name__)


#: Headers a browser app may send and read across origins (SMART apps read Location, ETag and
#: Content-Location after writes, and the async $analyze headers).
_CORS_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "Accept",
    "Prefer",
    "If-Match",
    "If-None-Match",
    "If-None-Exist",
    "If-Modified-Since",
    "Idempotency-Key",
    "X-Correlation-ID",
    "X-Request-ID",
]
_CORS_EXPOSED_HEADERS = [
    "Location",
    "Content-Location",
    "ETag",
    "Last-Modified",
    "WWW-Authenticate",
    "Retry-After",
    "X-Progress",
    "X-Correlation-ID",
    "X-Request-ID",
]


def mapping_context(settings: Settings) -> MappingContext:
    """The DICOM -> FHIR mapping settings. Endpoint.address names the facade's own DICOMweb proxy
    (with auth on and off, ADR 0016), so a client fetches pixels with the credentials it has."""
    return MappingContext(
        patient_identifier_system=settings.patient_identifier_system,
        issuer_systems=settings.issuer_systems,
        default_timezone=settings.timezone,
        dicomweb_url=settings.dicomweb_link_url,
    )


def _orders_by_accession(orders: ResourceProvider, settings: Settings) -> OrdersByAccession:
    """One ServiceRequest search (identifier=a,b,c) for the accession numbers of a page."""

    async def lookup(accessions: list[str]) -> dict[str, list[str]]:
        wanted = set(accessions)
        search = SearchBuilder(orders, base_url=settings.base_url).where_any("identifier", accessions)
        found: dict[str, list[str]] = {}
        for order in await search.count(200).matches():
            for identifier in order.get("identifier", []):
                if identifier.get("value") in wanted:
                    found.setdefault(identifier["value"], []).append(order["id"])
        return found

    return lookup


class _RunningWatcher:
    def __init__(self, watcher: ElectedWatcher) -> None:
        self.watcher = watcher
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(watcher.run_forever(self._stop), name="watcher-election")

    async def stop(self) -> None:
        self._stop.set()
        await self._task


def _arrival_rule(settings: Settings) -> TaskRule:
    """Which arrived studies get an analysis (and a reading) Task. The demo study is analysed at
    start-up through its arrival Task unless FACADE_DEMO_ANALYZE=false."""
    return TaskRule(
        settings.task_modalities,
        skip_studies=frozenset() if settings.demo_analyze else frozenset({DEMO_STUDY_UID}),
    )


def _subscribe_to_arrivals(
    settings: Settings, bus: EventBus, store: ResourceStore, visible: list[PipelinedProvider]
) -> None:
    """What happens when a study arrives: an analysis Task (written through the pipeline, as the
    server's own work) and, when the upstream mirrors the PACS, a snapshot in the outbox."""
    by_type = {p.resource_type: p for p in visible}
    creator = ArrivalTaskCreator(
        by_type["Task"], by_type["ServiceRequest"], _arrival_rule(settings), settings.base_url
    )

    async def create_task(study: StudyArrived) -> None:
        with origin_scope(Origin.INTERNAL):
            await creator(study)

    bus.subscribe(StudyArrived, create_task)
    if settings.fhir_upstream_url and settings.sync.mirror_studies:
        queue = OutboxQueue(store.engine)

        async def mirror(study: StudyArrived) -> None:
            await run_in_threadpool(queue.enqueue_snapshot, "ImagingStudy", study.study_uid)

        bus.subscribe(StudyArrived, mirror)


def _study_deletion(
    settings: Settings, orthanc: OrthancRestClient | None, store: ResourceStore
) -> StudyDeletion | None:
    """DELETE ImagingStudy/{id} only when switched on (ADR 0040); reflected upstream when there is one."""
    if not settings.study_delete.enabled or orthanc is None:
        return None
    return StudyDeletion(orthanc, OutboxQueue(store.engine) if settings.fhir_upstream_url else None)


def _start_watcher(
    settings: Settings,
    orthanc: OrthancRestClient | None,
    store: ResourceStore,
    bus: EventBus,
    hold: Callable[[StudyArrived], Awaitable[bool]] | None = None,
) -> _RunningWatcher | None:
    """Publish each stable study of Orthanc's change feed as StudyArrived, when Orthanc's REST API is
    configured and watching is on. Published strictly: the feed position moves on only once every
    subscriber took the study (they are idempotent, the watcher delivers at least once). Of several
    replicas on one database, the one holding the watcher lease watches (ADR 0032)."""
    if orthanc is None or not settings.watch_studies:
        return None

    async def on_study(study: StudyArrived) -> None:
        if hold is not None and await hold(study):
            return  # held for reconciliation (ADR 0039): published once it arrives corrected
        await bus.publish(study, strict=True)

    feed = f"orthanc-changes:{settings.orthanc_url}"
    positions = SqlFeedPositionStore(store.engine, feed)
    watcher = StudyArrivalWatcher(orthanc, positions, on_study, poll_interval=settings.watch_poll_interval)
    leases = Leases(store.engine, settings.replica_name, settings.replica.lease_seconds)
    log.info(
        "Watching %s/changes for new studies (Tasks for %s)",
        settings.orthanc_url,
        ", ".join(sorted(settings.task_modalities)),
    )
    return _RunningWatcher(ElectedWatcher(watcher, leases, f"watcher:{feed}"))


def open_store_engine(settings: Settings) -> Engine:
    """The store's engine; the default SQLite file lives in the data directory, created here."""
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_store_engine(url)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application. The PACS connection pool opens and closes with the lifespan."""
    settings = settings or Settings()
    dicomweb = DicomwebClient(
        settings.dicomweb_url,
        timeout=settings.dicomweb_timeout,
        max_connections=settings.dicomweb_max_connections,
        auth=settings.pacs_auth,
    )
    orthanc = (
        OrthancRestClient(
            settings.orthanc_url,
            timeout=settings.dicomweb_timeout,
            max_connections=settings.dicomweb_max_connections,
            auth=settings.pacs_auth,
        )
        if settings.orthanc_url
        else None
    )
    proxy = DicomwebProxyClient.from_settings(settings)
    ctx = mapping_context(settings)
    # Query/retrieve from the configured remote DICOM nodes, through Orthanc (ADR 0041).
    dimse = (
        OrthancDimse(
            settings.orthanc_url,
            timeout=settings.dicomweb_timeout,
            max_connections=settings.dicomweb_max_connections,
            auth=settings.pacs_auth,
        )
        if settings.orthanc_url and settings.remote_pacs.nodes
        else None
    )
    remote_pacs = (
        RemotePacsRuntime(
            [parse_remote_node(entry) for entry in settings.remote_pacs.nodes],
            dimse,
            ctx,
            local_aet=settings.remote_pacs.local_aet,
            base_url=settings.base_url,
        )
        if dimse
        else None
    )
    bus = EventBus()  # after-commit events for every consumer (ADR 0022)
    store = ResourceStore(open_store_engine(settings), bus=bus)
    patients = PatientProvider(dicomweb, ctx, records=StoredResourceProvider("Patient", store))
    worklist = WorklistFolder(settings.worklist.folder) if settings.worklist.folder else None
    # The procedure catalogue (ADR 0018): bundled ConceptMap, then the site's, whose entries win.
    catalogue = bundled_catalogue().with_site_maps(settings.worklist.procedure_map)
    stored = stored_providers(
        store,
        worklist,
        functools.partial(read_or_none, patients),
        settings.worklist.station_ae_title,
        catalogue=catalogue,
        stations=settings.worklist.stations,
    )
    # Topic-based Subscriptions (ADR 0026): the matcher is on the bus before any write.
    subscriptions = SubscriptionRuntime(settings, store)
    stored = [subscriptions.provider if p.resource_type == "Subscription" else p for p in stored]
    orders = next(p for p in stored if p.resource_type == "ServiceRequest")
    providers: list[ResourceProvider] = [
        ImagingStudyProvider(
            dicomweb,
            ctx,
            orthanc,
            _orders_by_accession(orders, settings),
            _study_deletion(settings, orthanc, store),
        ),
        patients,
        EndpointProvider(ctx, remote_pacs.endpoints if remote_pacs else ()),
        *stored,
        *artifact_providers(extra=catalogue.concept_maps),
        subscriptions.topic_provider,
    ]
    sync = (
        SyncRuntime(settings, store, {p.resource_type: p for p in providers})
        if settings.fhir_upstream_url
        else None
    )
    # Every caller-facing path (router, Bundles, includes, $analyze, its jobs and the worklist acting
    # for a client) sees the providers through the interaction pipeline, whose first stage is the one
    # authorization point (ADR 0009, ADR 0022).
    authorization = AuthorizationStage(providers, settings.base_url)
    recorder = audit_recorder(settings, store)
    # The audit first: it records the interactions the authorization refuses too.
    stages: list[Stage] = [audit_stage(settings, recorder), authorization] if recorder else [authorization]
    # The reading workflow's rules on claims and signed reports (ADR 0033), after the authorization.
    reading = (
        ReadingRuntime(settings, dicomweb, _arrival_rule(settings), recorder)
        if settings.reading.enabled
        else None
    )
    if reading:
        stages.append(reading.stage)
    # Reconciliation of arrivals (ADR 0039): completing a reconcile Task corrects its study.
    reconcile = (
        ReconcileRuntime(settings, orthanc, ctx, recorder) if orthanc and settings.reconcile.enabled else None
    )
    if reconcile:
        stages.append(reconcile.stage)
    pipeline = Pipeline(stages, bus, current_access.get)
    visible = pipeline.wrap(providers)
    atomic = atomic_scope(store)  # one per store: it bounds the transactions open at once
    _subscribe_to_arrivals(settings, bus, store, visible)
    if reconcile:
        reconcile.bind({p.resource_type: p for p in visible}, StoredResourceProvider("Patient", store))
    if reading:
        reading.subscribe(bus, {p.resource_type: p for p in visible})
    subscription_routes = subscriptions.bind(visible, recorder)
    if worklist is not None:
        OrderWorklist(
            worklist,
            functools.partial(read_or_none, patients),
            next(p for p in visible if p.resource_type == "Task"),
            station=settings.worklist.station_ae_title,
            stations=settings.worklist.stations,
            catalogue=catalogue,
        ).subscribe(bus)
    analyze = (
        AnalyzeRuntime(
            settings,
            qido=dicomweb,
            atomic=atomic,
            providers={p.resource_type: p for p in providers},
            visible={p.resource_type: p for p in visible},
            authorization=authorization,
            leases=Leases(store.engine, settings.replica_name, settings.replica.lease_seconds),
        )
        if settings.analyze.enabled
        else None
    )

    importing = (  # ImagingStudy/$import (ADR 0038): stores through Orthanc's REST API
        ImportService(
            settings,
            store.engine,
            {p.resource_type: p for p in visible},
            next(p for p in providers if p.resource_type == "Task"),
            ctx,
        )
        if settings.imports.enabled and settings.orthanc_url
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        schema_version = await run_in_threadpool(upgrade, store.engine)
        log.info("SQL store %s at schema version %s", store.engine.url.render_as_string(), schema_version)
        if audit:
            await audit.start()
        await dicomweb.open()
        await proxy.open()
        if orthanc:
            await orthanc.open()
        if dimse:
            await dimse.open()
        watching = _start_watcher(settings, orthanc, store, bus, reconcile.hold if reconcile else None)
        app.state.watcher = watching.watcher if watching else None
        if analyze:
            await analyze.start()
        if reading:
            await reading.start()
        if sync:
            await sync.start()
        if deidentify:
            await deidentify.deidentifier.open()
        await subscriptions.start()
        log.info(
            "fhir-facade %s: FHIR base %s, PACS %s",
            __version__,
            settings.base_url,
            settings.dicomweb_url,
        )
        try:
            yield
        finally:
            if audit:  # first: writes out every event still queued, while the store is open
                await audit.stop()
            await subscriptions.stop()
            if deidentify:
                await deidentify.deidentifier.close()
            if sync:
                await sync.stop()
            if analyze:
                await analyze.stop()
            if importing:
                await importing.close()
            if reading:
                await reading.stop()
            if watching:
                await watching.stop()
            if remote_pacs:
                await remote_pacs.stop()
            if dimse:
                await dimse.close()
            await dicomweb.close()
            await proxy.close()
            if orthanc:
                await orthanc.close()
            store.engine.dispose()

    app = FastAPI(
        title="fhir-facade",
        version=__version__,
        description="FHIR R4 gateway to a DICOMweb PACS. FHIR base: /fhir",
        lifespan=lifespan,
        docs_url=None,  # install_api_docs serves /docs without a CDN; no ReDoc (ADR 0021)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.dicomweb = dicomweb
    app.state.orthanc = orthanc
    app.state.store = store
    app.state.providers = providers
    app.state.pipeline = pipeline
    app.state.analyze = analyze
    app.state.sync = sync
    app.state.subscriptions = subscriptions
    install_error_handlers(app, PACS_ERROR_TRANSLATORS)
    # Inside the audit (refusals are audited like any 4xx), outside everything that reads a body.
    app.add_middleware(RequestLimitsMiddleware, limits=BodyLimits.from_settings(settings))
    audit = install_audit(app, settings, recorder)  # inside CORS: preflights are not audited
    deidentify = deidentify_runtime(settings, visible)
    operations = {
        **(analyze.operations if analyze else {}),
        **(reading.operations if reading else {}),
        "Subscription": list(subscriptions.operations),
    }
    if importing:  # ImagingStudy has $analyze too: add, do not replace
        operations["ImagingStudy"] = [
            *operations.get("ImagingStudy", []),
            *importing.operations["ImagingStudy"],
        ]
    if remote_pacs:
        operations["ImagingStudy"] = [*operations.get("ImagingStudy", []), *remote_pacs.operations]
    if deidentify:
        operations["ImagingStudy"] = [*operations.get("ImagingStudy", []), *deidentify.operations]
    authenticate, security = _install_security(app, settings, ExpiringEntries(store.engine))
    guarded = [Depends(authenticate)]
    # Admin-only whether or not an upstream is set: a non-admin learns nothing of the configuration.
    sync_router = sync.router if sync else build_unconfigured_sync_router()
    app.include_router(sync_router, dependencies=[*guarded, Depends(server_admin_guard())])
    if analyze:  # before the FHIR router, whose /{type}/{id} catch-all would shadow the job URLs
        studies = next(p for p in visible if p.resource_type == "ImagingStudy")
        tasks = next(p for p in providers if p.resource_type == "Task")
        guard = analyze_guard(studies, tasks, settings.base_url)
        app.include_router(analyze.router, dependencies=[*guarded, Depends(guard)])
    if importing:  # before the FHIR router too
        app.include_router(importing.router, dependencies=guarded)
    if deidentify:  # $deidentify (ADR 0040), before the FHIR router too
        app.include_router(deidentify.router, dependencies=guarded)
    if reading and reading.router:  # $ai-performance (ADR 0034), before the FHIR router too
        app.include_router(reading.router, dependencies=guarded)
    if remote_pacs:  # $query-remote, $retrieve-remote (ADR 0041), before the FHIR router too
        by_type = {p.resource_type: p for p in visible}
        app.include_router(
            remote_pacs.bind(pipeline, by_type["Task"], by_type["ImagingStudy"]), dependencies=guarded
        )
    # Before the FHIR router, whose /{type}/{id} catch-all would shadow the operations.
    app.include_router(subscription_routes, dependencies=guarded)
    # The websocket channel's socket: no bearer dependency, a browser cannot send one; the binding
    # token from $get-ws-binding-token (a guarded route) is its credential (ADR 0028).
    app.include_router(subscriptions.socket_router())
    app.include_router(
        build_fhir_router(visible, settings, atomic, operations, authenticate=authenticate, security=security)
    )
    app.include_router(
        build_dicomweb_proxy_router(settings, proxy, max_stow_bytes=settings.limits.max_stow_body_bytes),
        dependencies=guarded,
    )
    app.include_router(metrics_router)
    # The SMART imaging app (ADR 0043); with an external authorization server it POSTs to that
    # server's token endpoint, the one origin besides the facade its policy admits.
    install_web_app(app, settings.web_app, connect_origins=_external_token_origins(settings))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=_CORS_REQUEST_HEADERS,
            expose_headers=_CORS_EXPOSED_HEADERS,
            max_age=600,
        )
    install_openapi(app)
    install_api_docs(app)
    install_correlation(app)  # outermost: every response, errors included, carries the id
    return app


def _external_token_origins(settings: Settings) -> list[str]:
    """The origin of an external authorization server's token endpoint (none for the built-in one)."""
    if settings.auth != "smart" or settings.builtin_issuer:
        return []
    parts = urlsplit(AuthorizationEndpoints.from_settings(settings).token)
    return [f"{parts.scheme}://{parts.netloc}"] if parts.scheme and parts.netloc else []


def _install_security(
    app: FastAPI, settings: Settings, shared: ExpiringEntries
) -> tuple[Authenticator | BearerScheme, dict[str, Any] | None]:
    """FACADE_AUTH=smart: token validation, discovery and (without an external issuer) the built-in
    authorization server, whose codes, replay cache and lockout counters are `shared` in the store.
    Returns the authenticating dependency and CapabilityStatement.rest.security."""
    if settings.auth != "smart":
        return Authenticator(None), None
    keys = None
    compartments = None
    if settings.builtin_issuer:
        from fhir_facade.auth.server import BuiltinAuthorizationServer

        recorder = getattr(app.state, "audit", None)
        refusals = (
            AuthenticationAudit(recorder, site=settings.public_root, issuer=settings.token_issuer)
            if recorder is not None
            else None
        )
        # The SMART app at /app is registered whenever it is served (ADR 0043).
        builtin_clients = [imaging_app_client(settings.public_root)] if settings.web_app.enabled else []
        server = BuiltinAuthorizationServer(
            settings, audit=refusals, shared=shared, builtin_clients=builtin_clients
        )
        app.include_router(server.router)
        keys = StaticKeys(server.public_key_set())
        compartments = server.registry.user_compartments
    endpoints = AuthorizationEndpoints.from_settings(settings)
    app.include_router(build_discovery_router(endpoints, builtin=settings.builtin_issuer))
    authenticate = BearerScheme(
        Authenticator(
            bearer_validator(settings, keys), blocking=keys is None, user_compartments=compartments
        ),
        token_url=endpoints.token,
    )
    log.info(
        "SMART on FHIR security on: tokens from %s for %s", settings.token_issuer, settings.token_audience
    )
    return authenticate, capability_security(endpoints, cors=bool(settings.cors_origins))
