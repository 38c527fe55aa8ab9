"""The one Settings object: every knob of the facade, read from `FACADE_*` environment variables.

All settings are optional; the defaults describe the embedded set-up (a local Orthanc on
127.0.0.1:8042, a SQLite file under the data directory, the facade on 127.0.0.1:8080).
"""

from __future__ import annotations

import os
import secrets
import socket
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fhir_facade.embedded.dicom_peers import parse_dicom_peer
from fhir_facade.worklist import check_stations, load_concept_maps

__all__ = [
    "AnalyzeSettings",
    "DeidentifySettings",
    "ImportSettings",
    "InferenceSettings",
    "LimitsSettings",
    "LockoutSettings",
    "ReadingSettings",
    "ReconcileSettings",
    "RemotePacsSettings",
    "Settings",
    "SettingsSection",
    "StudyDeleteSettings",
    "SubscriptionSettings",
    "SyncSettings",
    "UpstreamSettings",
    "ViewerSettings",
    "WebAppSettings",
    "WorklistSettings",
]

#: Where scripts/install_web_vendor.py puts the pinned browser packages in a checkout (ADR 0043).
REPO_WEB_VENDOR = Path(__file__).resolve().parent.parent / ".web-vendor"


class SettingsSection(BaseModel):
    """One area's settings as a typed, read-only group (`settings.sync.batch_size`).

    The environment keeps the flat `FACADE_<AREA>_<NAME>` variables deployments already set (and
    `Settings` validates and documents them in one place); a section field reads the Settings field
    `prefix + name`, or the one `renamed` gives. Code of an area takes its section, not the whole
    Settings, so what it depends on is visible in its signature.
    """

    model_config = ConfigDict(frozen=True)
    prefix: ClassVar[str] = ""
    renamed: ClassVar[dict[str, str]] = {}

    @classmethod
    def of(cls, settings: Any) -> Self:
        return cls(
            **{name: getattr(settings, cls.renamed.get(name, cls.prefix + name)) for name in cls.model_fields}
        )


class UpstreamSettings(SettingsSection):
    """How to reach the upstream FHIR server (FACADE_FHIR_UPSTREAM_URL, FACADE_UPSTREAM_*). `auth`
    is none, basic (username/password), bearer (a fixed token) or smart-backend (SMART Backend
    Services: client_id + private key; token_url, when left out, is discovered from
    `[base_url]/.well-known/smart-configuration`)."""

    prefix = "upstream_"
    renamed = {
        "base_url": "fhir_upstream_url",
        "token_url": "upstream_smart_token_url",
        "client_id": "upstream_smart_client_id",
        "private_key_path": "upstream_smart_private_key_path",
        "key_id": "upstream_smart_key_id",
        "algorithm": "upstream_smart_algorithm",
        "scope": "upstream_smart_scope",
    }

    base_url: str
    auth: str = "none"
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout: float = 10.0
    token_url: str | None = None
    client_id: str | None = None
    private_key_path: str | Path | None = None
    key_id: str | None = None
    algorithm: str = "RS384"
    scope: str = "system/*.write system/*.read"


class SyncSettings(SettingsSection):
    """The outbox worker (FACADE_SYNC_*, ADR 0007)."""

    prefix = "sync_"
    in_process: bool
    poll_interval: float
    batch_size: int
    mirror_studies: bool
    lease_seconds: float


class SubscriptionSettings(SettingsSection):
    """Topic-based Subscriptions: delivery and retention (FACADE_SUBSCRIPTION_*, ADR 0026)."""

    prefix = "subscription_"
    endpoints: tuple[str, ...]
    max_failures: int
    retry_seconds: float
    poll_interval: float
    timeout: float
    event_retention: float
    concurrency: int
    lease_seconds: float
    ws_token_seconds: float


class WorklistSettings(SettingsSection):
    """Orders -> DICOM Modality Worklist (FACADE_WORKLIST_*, ADR 0018)."""

    prefix = "worklist_"
    renamed = {"folder": "worklist_dir"}
    folder: Path | None
    station_ae_title: str
    procedure_map: Path | None
    stations: dict[str, str]


class InferenceSettings(SettingsSection):
    """Where the model runs (FACADE_INFERENCE_*)."""

    prefix = "inference_"
    backend: Literal["onnxruntime", "kserve-v2", "torch"]
    url: str | None
    providers: tuple[str, ...] | None
    threads: int | None
    device_id: int
    torch_device: Literal["auto", "cuda", "cpu"]
    torch_precision: Literal["fp32", "tf32", "bf16"]
    max_batch: int
    max_wait_ms: float


class AnalyzeSettings(SettingsSection):
    """`$analyze` and the analysis worklist (FACADE_ANALYZE_*, ADR 0006)."""

    prefix = "analyze_"
    enabled: bool
    default_model: str
    worklist: bool
    poll_interval: float
    workers: int
    timeout: float | None
    write_sr: bool
    slice_applicability: bool
    saliency: bool
    saliency_patch: int
    saliency_stride: int
    decode_workers: int


class ReadingSettings(SettingsSection):
    """The reading worklist and the radiologist's report (FACADE_READING_*, ADR 0033).

    Triage rules, first match wins: a finding in `critical_codes` -> stat; a finding in
    `negative_codes` -> routine; a finding scored under `low_confidence` -> routine with a note
    "review: low AI confidence"; any other (positive) finding scored at or over `urgent_threshold`
    -> urgent; otherwise routine. Codes are `system|code`."""

    prefix = "reading_"
    enabled: bool
    on_arrival: bool
    urgent_threshold: float
    low_confidence: float
    critical_codes: frozenset[str]
    negative_codes: frozenset[str]
    pdf_to_pacs: bool
    critical_ack_timeout: float
    critical_check_interval: float


class LimitsSettings(SettingsSection):
    """Request limits against hostile input (FACADE_LIMITS_*, ADR 0010)."""

    prefix = "limits_"
    max_body_bytes: int
    max_stow_body_bytes: int
    max_import_body_bytes: int
    body_timeout: float
    json_max_depth: int
    json_max_number_length: int
    keep_alive_timeout: float
    max_header_bytes: int
    max_concurrency: int | None


class LockoutSettings(SettingsSection):
    """Brute-force protection of the built-in authorization server (FACADE_AUTH_LOCKOUT_*, ADR 0011)."""

    prefix = "auth_lockout_"
    failures: int
    address_failures: int
    window: float
    duration: float
    max_duration: float
    delay: float
    max_delay: float
    max_tracked: int


class ReconcileSettings(SettingsSection):
    """Reconciliation of arrivals (FACADE_RECONCILE_*, ADR 0039): which arrived studies are held
    for a person, with a reconcile Task, before anything else is done with them."""

    prefix = "reconcile_"
    enabled: bool
    require_known_patient: bool


class ReplicaSettings(SettingsSection):
    """Several facade processes on one database (FACADE_REPLICA_*, ADR 0032)."""

    prefix = "replica_"
    lease_seconds: float
    id: str | None


class ImportSettings(SettingsSection):
    """ImagingStudy/$import (FACADE_IMPORT_*, ADR 0038)."""

    prefix = "import_"
    enabled: bool
    store_concurrency: int
    dciodvfy: Literal["series", "all", "off"]


class RemotePacsSettings(SettingsSection):
    """Query/retrieve from remote DICOM nodes (FACADE_REMOTE_PACS_*, ADR 0041)."""

    prefix = "remote_pacs_"
    nodes: tuple[str, ...]
    local_aet: str


class DeidentifySettings(SettingsSection):
    """`$deidentify` on ImagingStudy (FACADE_DEIDENTIFY_*, ADR 0040): the HMAC secret of the
    pseudonyms and the named DICOMweb stores a study may be sent to (never a URL from the request)."""

    prefix = "deidentify_"
    enabled: bool
    secret: SecretStr | None
    destinations: dict[str, str]
    max_instances: int
    timeout: float


class StudyDeleteSettings(SettingsSection):
    """`DELETE ImagingStudy/{id}` (FACADE_STUDY_DELETE_*, ADR 0040): off unless switched on."""

    prefix = "study_delete_"
    enabled: bool


class ViewerSettings(SettingsSection):
    """The OHIF viewer served at /viewer/ (FACADE_VIEWER_*, ADR 0044): on by default; `dist_dir` is
    OHIF's prebuilt dist (None: `ohif/dist` in FACADE_WEB_APP_VENDOR_DIR, which setup.sh fills)."""

    prefix = "viewer_"
    enabled: bool
    dist_dir: Path | None


class WebAppSettings(SettingsSection):
    """The SMART imaging app at /app (FACADE_WEB_APP_*, ADR 0043): on by default; its browser
    library (fhirclient) comes from the vendor folder scripts/install_web_vendor.py fills."""

    prefix = "web_app_"
    enabled: bool
    vendor_dir: Path


class Settings(BaseSettings):
    """Typed, validated configuration. Environment variables use the `FACADE_` prefix."""

    model_config = SettingsConfigDict(env_prefix="FACADE_", frozen=True, extra="ignore")

    dicomweb_url: str = Field(
        "http://127.0.0.1:8042/dicom-web",
        description="DICOMweb base URL of the PACS (QIDO-RS/WADO-RS/STOW-RS root).",
    )
    orthanc_url: str | None = Field(
        None, description="Orthanc REST root, for Orthanc-only features (change feed, worklists)."
    )
    dicomweb_timeout: float = Field(
        10.0, gt=0, description="Seconds before a PACS request is abandoned (connect+read)."
    )
    dicomweb_max_connections: int = Field(20, ge=1, description="Connection pool size to the PACS.")
    # Links handed to clients (ADR 0016): the proxy's address, never the PACS's, unless told.
    dicomweb_expose_pacs_url: bool = Field(
        False,
        description=(
            "Name FACADE_DICOMWEB_URL in FHIR answers (Endpoint.address, DiagnosticReport."
            "presentedForm.url) instead of the facade's own DICOMweb proxy (<root>/dicom-web). "
            "Only with FACADE_AUTH=none, for clients that may reach the PACS directly; the proxy's "
            "answers name the proxy whatever this says."
        ),
    )

    @model_validator(mode="after")
    def _pacs_url_stays_inside(self) -> Settings:
        if self.dicomweb_expose_pacs_url and self.auth == "smart":
            raise ValueError(
                "FACADE_DICOMWEB_EXPOSE_PACS_URL=true with FACADE_AUTH=smart would hand clients links "
                "that bypass the token check (and the PACS's own credentials): refused"
            )
        return self

    @property
    def dicomweb_proxy_url(self) -> str:
        """The facade's DICOMweb proxy as clients reach it: FACADE_BASE_URL's root + /dicom-web."""
        return f"{self.public_root}/dicom-web"

    @property
    def dicomweb_link_url(self) -> str:
        """The DICOMweb base of links in FHIR answers: the proxy, or the PACS when exposed."""
        return self.dicomweb_url if self.dicomweb_expose_pacs_url else self.dicomweb_proxy_url

    # PACS access (ADR 0013): the credentials the facade signs in to the PACS with, and the DICOM
    # peers the embedded Orthanc admits.
    pacs_username: str | None = Field(
        None,
        description=(
            "HTTP Basic user for the PACS (RFC 7617), sent on every DICOMweb and Orthanc REST request "
            "(unset: none). `fhir-facade embedded` generates its own."
        ),
    )
    pacs_password: SecretStr | None = Field(None, description="HTTP Basic password for the PACS.")
    pacs_modalities: tuple[str, ...] = Field(
        (),
        description=(
            "DICOM peers the embedded Orthanc admits, as a JSON list of 'AET@ip-address[:port]' "
            "(port default 104): each may C-ECHO, query the worklist and C-STORE, from that address "
            "only. FACADE_WORKLIST_STATION_AE_TITLE@127.0.0.1 is always admitted; anyone else is "
            "refused."
        ),
    )
    remote_pacs_nodes: tuple[str, ...] = Field(
        (),
        description=(
            "Remote DICOM nodes (other PACS, modalities) to query and retrieve from, as a JSON list "
            "of 'NAME=AET@ip-address[:port]'; each NAME must also be an Orthanc DicomModalities "
            "entry (the embedded Orthanc gets them). Only these can be addressed (ADR 0041)."
        ),
    )
    remote_pacs_local_aet: str = Field(
        "ORTHANC", description="AE title of the local Orthanc: the C-MOVE destination of a retrieve."
    )
    data_dir: Path = Field(Path(".data"), description="Where the embedded set-up keeps its files.")
    database_url: str | None = Field(
        None, description="SQL store URL; default sqlite:///<data_dir>/facade.sqlite3."
    )
    base_url: str = Field(
        "http://127.0.0.1:8080/fhir",
        description="Public FHIR base URL, used in Bundle links and fullUrls.",
    )
    fhir_upstream_url: str | None = Field(
        None, description="Upstream FHIR server (HAPI) that every stored resource is synced to."
    )
    upstream_auth: Literal["none", "basic", "bearer", "smart-backend"] = Field(
        "none",
        description=(
            "Upstream authentication; smart-backend = SMART Backend Services "
            "(client_credentials + private_key_jwt)."
        ),
    )
    upstream_smart_token_url: str | None = Field(
        None,
        description=(
            "SMART token endpoint; default: token_endpoint of <upstream>/.well-known/smart-configuration. "
            "Used verbatim as the assertion's aud."
        ),
    )
    upstream_smart_client_id: str | None = Field(None, description="client_id registered upstream.")
    upstream_smart_private_key_path: Path | None = Field(
        None, description="PEM private key signing the client assertion (RSA: RS384, EC P-384: ES384)."
    )
    upstream_smart_key_id: str | None = Field(None, description="kid of the public key registered upstream.")
    upstream_smart_algorithm: Literal["RS384", "ES384"] = Field("RS384", description="Assertion algorithm.")
    upstream_smart_scope: str = Field("system/*.write system/*.read", description="Scopes the sync asks for.")
    upstream_username: str | None = Field(None, description="Upstream basic-auth user.")
    upstream_password: str | None = Field(None, description="Upstream basic-auth password.")
    upstream_token: str | None = Field(None, description="Upstream bearer token.")
    upstream_timeout: float = Field(10.0, gt=0, description="Seconds before an upstream request fails.")
    sync_in_process: bool = Field(
        True, description="Run the sync worker in the server process (else run `fhir-facade sync`)."
    )
    sync_poll_interval: float = Field(0.5, gt=0, description="Seconds between outbox polls when idle.")
    sync_batch_size: int = Field(50, ge=1, description="Outbox rows leased per round.")
    sync_mirror_studies: bool = Field(
        False,
        description=(
            "Also upsert every stable study of the PACS upstream as an ImagingStudy (DICOMcast-style "
            "mirroring; needs FACADE_ORTHANC_URL and FACADE_WATCH_STUDIES). Off: only studies that "
            "stored resources reference are sent."
        ),
    )
    sync_lease_seconds: float = Field(
        60.0,
        gt=0,
        description=(
            "How long a worker owns the rows it leased; a crashed worker's rows are sent again "
            "(idempotently) after this. Keep it well above FACADE_UPSTREAM_TIMEOUT."
        ),
    )
    subscription_endpoints: tuple[str, ...] = Field(
        (),
        description=(
            'URL prefixes (JSON list, e.g. ["https://ehr.hospital.example/fhir-hooks/"]) a rest-hook '
            "Subscription's channel.endpoint must start with; anything else is refused (422), so a "
            "client cannot make the server call arbitrary hosts (SSRF). Empty (the default): no "
            "rest-hook Subscription is accepted."
        ),
    )
    subscription_max_failures: int = Field(
        5, ge=1, description="Failed deliveries in a row after which a Subscription's status becomes `error`."
    )
    subscription_retry_seconds: float = Field(
        1.0, gt=0, description="First retry delay of a failed delivery; doubles per failure, at most 300 s."
    )
    subscription_poll_interval: float = Field(
        0.2, gt=0, description="Seconds between polls of the subscription event rows when idle."
    )
    subscription_timeout: float = Field(10.0, gt=0, description="Seconds before a notification POST fails.")
    subscription_event_retention: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description=(
            "Seconds a delivered subscription event row is kept for `$events` replays; older rows "
            "that reached their receiver are purged by the delivery worker (undelivered ones never)."
        ),
    )
    subscription_concurrency: int = Field(
        64,
        ge=1,
        description=(
            "Subscriptions one replica delivers to at the same time (each still strictly in event "
            "order); bounds the open connections to receivers."
        ),
    )
    subscription_lease_seconds: float = Field(
        60.0,
        gt=0,
        description=(
            "How long a replica owns a subscription it leased for delivery; renewed with each "
            "delivered event. A crashed replica's subscriptions are taken over after this."
        ),
    )
    subscription_ws_token_seconds: float = Field(
        60.0,
        gt=0,
        description=(
            "Lifetime of a websocket binding token ($get-ws-binding-token): the socket's only "
            "credential, so short; a client binds within it, then asks for a new one to reconnect."
        ),
    )
    worklist_dir: Path | None = Field(
        None,
        description=(
            "Folder of Orthanc's ModalityWorklists plugin: active imaging ServiceRequests are "
            "written there as .wl items (unset: no worklist)."
        ),
    )
    watch_studies: bool = Field(
        True,
        description=(
            "Follow Orthanc's change feed (needs FACADE_ORTHANC_URL) and create an analysis Task "
            "for each new study that FACADE_TASK_MODALITIES selects."
        ),
    )
    task_modalities: frozenset[str] = Field(
        frozenset({"MR"}), description="Modalities whose new studies get an analysis Task (JSON list)."
    )
    demo_analyze: bool = Field(
        True,
        description=(
            "Give the demo study (fhir_facade/demo, loaded by `fhir-facade embedded`) an analysis Task "
            "when it arrives, like any new MR study, so it is analysed at start-up (once per store: "
            "the Task is kept). false: the demo study gets no arrival Task; $analyze still works."
        ),
    )
    reconcile_enabled: bool = Field(
        True,
        description="Hold an arrived study whose AccessionNumber is a stored order of another patient "
        "(and, with FACADE_RECONCILE_REQUIRE_KNOWN_PATIENT, one of no stored Patient) with a "
        "reconcile Task; completing it corrects the study in the PACS (needs FACADE_ORTHANC_URL).",
    )
    reconcile_require_known_patient: bool = Field(
        False,
        description="Hold an arrived study whose PatientID (+issuer) is no stored Patient's identifier. "
        "For sites whose EHR stores its Patients here; off, studies of patients the facade only knows "
        "from the PACS are not held.",
    )
    reading_enabled: bool = Field(
        True, description="Reading Tasks for studies that need a read, triaged by the AI result (ADR 0033)."
    )
    reading_on_arrival: bool = Field(
        True,
        description="A new study of FACADE_TASK_MODALITIES gets a routine reading Task at once; an AI "
        "result then re-triages it.",
    )
    reading_urgent_threshold: float = Field(
        0.8, ge=0, le=1, description="A positive AI finding scored at least this makes the read urgent."
    )
    reading_low_confidence: float = Field(
        0.6, ge=0, le=1, description="An AI finding scored under this is routine, with a review note."
    )
    reading_critical_codes: frozenset[str] = Field(
        frozenset(),
        description='AI findings (JSON list of "system|code") whose read is stat.',
    )
    reading_negative_codes: frozenset[str] = Field(
        frozenset({"http://snomed.info/sct|281900007", "http://snomed.info/sct|373068000"}),
        description='AI findings (JSON list of "system|code") that are no positive finding '
        "(default: No abnormality detected, Undetermined).",
    )
    reading_pdf_to_pacs: bool = Field(
        True, description="Store a final radiologist report in the PACS as an Encapsulated PDF."
    )
    reading_critical_ack_timeout: float = Field(
        3600.0,
        gt=0,
        description="Seconds the ordering practitioner has to acknowledge a critical result's "
        "Communication before it is escalated (a stat Task and an AuditEvent, ADR 0034).",
    )
    reading_critical_check_interval: float = Field(
        30.0, gt=0, description="Seconds between checks for unacknowledged critical results."
    )
    watch_poll_interval: float = Field(1.0, gt=0, description="Seconds between change-feed polls.")
    worklist_station_ae_title: str = Field(
        "ANY-SCU", description="ScheduledStationAETitle of the worklist items."
    )
    # Imaging orders -> worklist items (ADR 0005, 0018): the procedure catalogue and the stations.
    worklist_procedure_map: Path | None = Field(
        None,
        description=(
            "A site's FHIR ConceptMap (JSON file, or a folder of them) from procedure codes (LOINC, CPT, "
            "SNOMED CT, local) to DICOM modalities (DCM), read at start-up; its entries take precedence "
            "over the bundled catalogue (mappings/ConceptMap-procedure-to-modality.json)."
        ),
    )
    worklist_stations: dict[str, str] = Field(
        default_factory=dict,
        description=(
            'Scheduled Station AE Title per modality, as JSON, e.g. {"MR": "MR-SCANNER-1"}; a modality '
            "not listed gets FACADE_WORKLIST_STATION_AE_TITLE."
        ),
    )
    patient_identifier_system: str = Field(
        "urn:oid:2.16.840.1.113883.3.3719.1.1",
        description=(
            "Identifier.system for DICOM PatientID values that carry no IssuerOfPatientID "
            "(set it to your hospital's MRN namespace)."
        ),
    )
    issuer_systems: dict[str, str] = Field(
        default_factory=dict,
        description="IssuerOfPatientID -> Identifier.system, as JSON, for issuers that are not URIs.",
    )
    dicom_timezone: str = Field(
        "UTC",
        description=(
            "IANA zone assumed for DICOM dates/times that carry no TimezoneOffsetFromUTC "
            "(FHIR dateTimes with a time need an offset)."
        ),
    )
    inference_backend: Literal["onnxruntime", "kserve-v2", "torch"] = Field(
        "onnxruntime",
        description=(
            "Where $analyze runs models: in-process ONNX Runtime, or a remote server speaking the "
            "Open Inference Protocol (KServe v2 REST: Triton, KServe, MLServer) at FACADE_INFERENCE_URL, "
            "or in-process PyTorch on the ONNX model converted by onnx2torch (extra `torch`; ADR 0037)."
        ),
    )
    inference_url: str | None = Field(
        None, description="Base URL of the KServe v2 inference server (for inference_backend=kserve-v2)."
    )
    inference_providers: tuple[str, ...] | None = Field(
        None,
        description=(
            "ONNX Runtime execution providers in order of preference (JSON list); default: "
            "CUDAExecutionProvider then CPUExecutionProvider, keeping those that are installed."
        ),
    )
    inference_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads (default: ONNX Runtime's choice)."
    )
    inference_device_id: int = Field(
        0, ge=0, description="The GPU (CUDA ordinal) ONNX Runtime's CUDA provider and the torch backend use."
    )
    inference_torch_device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description=(
            "torch backend: `auto` runs on the GPU when PyTorch sees one and says so in a warning when "
            "it falls back to the CPU; `cuda` refuses to start without one; `cpu` never uses one."
        ),
    )
    inference_torch_precision: Literal["fp32", "tf32", "bf16"] = Field(
        "tf32",
        description=(
            "torch backend on a GPU: fp32 (exact), tf32 (TensorFloat-32 matrix products; agrees with "
            "ONNX Runtime to about 1e-5) or bf16 autocast (about 1e-4, fastest)."
        ),
    )
    inference_max_batch: int = Field(
        8,
        ge=1,
        description=(
            "Most slices in one model call; concurrent analyses share it, filled round-robin across "
            "studies (ADR 0036). Raise it on a GPU (64-256)."
        ),
    )
    inference_max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="Milliseconds a batch waits for more slices before it runs (ADR 0036).",
    )
    analyze_enabled: bool = Field(
        True, description="Offer $analyze (loads and warms up the models at start-up)."
    )
    analyze_default_model: str = Field(
        "brain-tumor-vgg16",
        description="Model manifest (operations/models/<id>.json) $analyze runs by default.",
    )
    analyze_worklist: bool = Field(
        True, description="Run requested analysis Tasks of the worklist (Task code analyze)."
    )
    analyze_poll_interval: float = Field(2.0, gt=0, description="Seconds between worklist polls.")
    analyze_workers: int = Field(
        4,
        ge=1,
        description="Analyses that run at the same time (their slices share model batches, ADR 0036).",
    )
    analyze_decode_workers: int = Field(
        2, ge=1, description="Threads that decode and preprocess images for all analyses (ADR 0036)."
    )
    analyze_timeout: float | None = Field(
        None, gt=0, description="Seconds before an analysis is abandoned (default: the model manifest's)."
    )
    analyze_write_sr: bool = Field(
        True, description="Store each $analyze result in the PACS as a DICOM Comprehensive 3D SR (STOW-RS)."
    )
    analyze_slice_applicability: bool = Field(
        True,
        description=(
            "Leave slices outside the model's applicability (its manifest's slice_applicability) out of "
            "the study decision and list them in the report (ADR 0031). false: every slice counts, as "
            "before; only to measure the step's cost or reproduce an earlier result."
        ),
    )
    analyze_saliency: bool = Field(
        False,
        description=(
            "With a positive finding, compute an occlusion-sensitivity map of the key image with the "
            "model and store it as a DICOM Parametric Map next to the SR, referenced from the SR and the "
            "report (ADR 0035). Off by default: it costs several times the analysis (docs/performance.md)."
        ),
    )
    analyze_saliency_patch: int = Field(
        48, ge=4, description="Side of the occluding square, in model input pixels (ADR 0035)."
    )
    analyze_saliency_stride: int = Field(
        24, ge=1, description="Step between occluding squares, in model input pixels (ADR 0035)."
    )
    default_page_size: int = Field(20, ge=1, description="Search page size when _count is absent.")
    max_page_size: int = Field(500, ge=1, description="Upper bound for _count.")
    limits_max_body_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest request body of every route but DICOMweb STOW-RS (FHIR JSON, Bundles, $analyze, "
            "/auth forms); larger ones get 413, from Content-Length before the body is read."
        ),
    )
    limits_max_stow_body_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest STOW-RS body (POST under /dicom-web); the proxy holds it in memory while it "
            "checks it, so keep it within the server's memory."
        ),
    )
    limits_max_import_body_bytes: int = Field(
        16 * 1024**3,
        ge=1024,
        description=(
            "Largest ImagingStudy/$import body (a zip of thousands of instances); it is written to a "
            "temporary file as it arrives, never held in memory (ADR 0038)."
        ),
    )
    import_enabled: bool = Field(
        True, description="Serve ImagingStudy/$import (needs FACADE_ORTHANC_URL; ADR 0038)."
    )
    import_store_concurrency: int = Field(
        4, ge=1, le=64, description="Instances an import posts to Orthanc at once."
    )
    import_dciodvfy: Literal["series", "all", "off"] = Field(
        "series",
        description=(
            "Which instances dicom3tools' dciodvfy checks besides the built-in checks: the first of "
            "each series, all, or none (ADR 0038)."
        ),
    )
    limits_body_timeout: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds a request may go without sending any of the body it announced before it is "
            "answered 408 and its connection closed (like nginx client_body_timeout)."
        ),
    )
    limits_json_max_depth: int = Field(
        100,
        ge=16,
        le=500,
        description=(
            "Deepest nesting of objects and arrays in a JSON request body (a Bundle entry holding a "
            "resource with nested extensions needs about 20); deeper bodies get 400."
        ),
    )
    limits_json_max_number_length: int = Field(
        64,
        ge=20,
        le=4000,
        description="Longest JSON number literal (characters) in a request body; longer ones get 400.",
    )
    limits_keep_alive_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds an idle keep-alive connection stays open (uvicorn timeout_keep_alive).",
    )
    limits_max_header_bytes: int = Field(
        16 * 1024,
        ge=4096,
        description=(
            "Most bytes of a request line and headers buffered before they are complete (uvicorn "
            "h11_max_incomplete_event_size); a head growing past it gets 400 from the server."
        ),
    )
    limits_max_concurrency: int | None = Field(
        1000,
        ge=1,
        description=(
            "Connections and requests served at once before new ones get 503 (uvicorn "
            "limit_concurrency); unset: no bound."
        ),
    )
    auth: Literal["none", "smart"] = Field(
        "none",
        description=(
            "none: every request is trusted (loopback only, see allow_unauthenticated_remote). "
            "smart: SMART on FHIR resource server; every FHIR and DICOMweb request needs a bearer "
            "token with scopes for what it does."
        ),
    )
    auth_issuer: str | None = Field(
        None,
        description=(
            "External authorization server (token 'iss'). Unset with auth=smart: the built-in "
            "authorization server at <public root>/auth issues the tokens."
        ),
    )
    auth_jwks_url: str | None = Field(
        None, description="JWKS of the external issuer (default: jwks_uri of its smart-configuration)."
    )
    auth_audience: str | None = Field(None, description="Required token 'aud' (default: FACADE_BASE_URL).")
    auth_authorize_url: str | None = Field(
        None, description="External issuer's authorization endpoint (advertised in discovery)."
    )
    auth_token_url: str | None = Field(
        None, description="External issuer's token endpoint (advertised in discovery)."
    )
    auth_introspection_url: str | None = Field(
        None,
        description=(
            "RFC 7662 introspection endpoint: bearer tokens that are not JWTs (opaque) are checked there."
        ),
    )
    auth_introspection_client_id: str | None = Field(
        None, description="Our client_id at the introspection endpoint."
    )
    auth_introspection_client_secret: str | None = Field(
        None, description="Our client secret at the introspection endpoint (HTTP Basic)."
    )
    auth_clients_file: Path | None = Field(
        None,
        description=(
            "Built-in authorization server: JSON file of registered clients and users "
            "(default: <data_dir>/auth-clients.json, written with a demo client on first start)."
        ),
    )
    auth_token_lifetime: int = Field(
        300,
        ge=30,
        le=300,
        description="Seconds an access token of the built-in server lives (at most 5 min).",
    )
    auth_refresh_token_lifetime: int = Field(
        8 * 3600,
        ge=1,
        le=24 * 3600,
        description=(
            "Seconds a refresh token family of the built-in server lives from the sign-in when the "
            "app was granted online_access (absolute: refreshing does not extend it; ADR 0047)."
        ),
    )
    auth_offline_refresh_token_lifetime: int = Field(
        30 * 24 * 3600,
        ge=1,
        description=(
            "Seconds a refresh token family lives from the sign-in when the app was granted "
            "offline_access (only apps registered for it; ADR 0047)."
        ),
    )
    # Brute-force protection of the built-in server's sign-in form and token endpoint (ADR 0011).
    auth_lockout_failures: int = Field(
        5,
        ge=1,
        description=(
            "Failed sign-ins of one username (or failed client authentications of one client_id) "
            "within auth_lockout_window that lock it out."
        ),
    )
    auth_lockout_address_failures: int = Field(
        20,
        ge=1,
        description=(
            "Failed attempts from one client address (any username or client) within "
            "auth_lockout_window that lock the address out (higher: many users may share a NAT)."
        ),
    )
    auth_lockout_window: float = Field(
        900, gt=0, description="Seconds over which failed attempts are counted (sliding window)."
    )
    auth_lockout_duration: float = Field(
        300, gt=0, description="Seconds of the first lockout; each repeated one lasts twice as long."
    )
    auth_lockout_max_duration: float = Field(
        3600, gt=0, description="Longest lockout of a repeat offender, in seconds."
    )
    auth_lockout_delay: float = Field(
        0.1,
        ge=0,
        description="Seconds the answer to a first failure is held back; doubles with each further one.",
    )
    auth_lockout_max_delay: float = Field(
        2.0, ge=0, description="Longest hold-back of a failure's answer, in seconds."
    )
    auth_lockout_max_tracked: int = Field(
        10_000,
        ge=1,
        description="Most usernames/client_ids and addresses remembered per endpoint (bounds memory).",
    )
    cors_origins: tuple[str, ...] = Field(
        (),
        description=(
            "Browser origins (JSON list) allowed to call the FHIR, discovery, DICOMweb and token "
            "endpoints (CORS)."
        ),
    )
    audit_enabled: bool | None = Field(
        None,
        description=(
            "Record an AuditEvent for every FHIR, DICOMweb and $analyze interaction "
            "(default: on with FACADE_AUTH=smart, off with none)."
        ),
    )
    allow_unauthenticated_remote: bool = Field(
        False,
        description=(
            "Listen on a non-loopback address with FACADE_AUTH=none. The facade serves patient data "
            "and images: without SMART security it refuses to, unless this says the network in front "
            "of it is trusted."
        ),
    )
    log_level: str = Field("INFO", description="Python logging level.")
    replica_lease_seconds: float = Field(
        15.0,
        gt=0,
        description=(
            "Lease time of the work one replica at a time does (the change-feed watcher, each running "
            "analysis): renewed every third of it; a replica that dies is replaced after at most this "
            "long (ADR 0032). Replica clocks must agree to well within it."
        ),
    )
    replica_id: str | None = Field(
        None, description="This process's name in the lease table (default: host name, process id, random)."
    )

    deidentify_enabled: bool = Field(
        False, description="Offer ImagingStudy/{id}/$deidentify (needs FACADE_DEIDENTIFY_SECRET)."
    )
    deidentify_secret: SecretStr | None = Field(
        None,
        description=(
            "HMAC key (at least 16 bytes) of the pseudonyms, UIDs and date shifts of $deidentify: the "
            "same key maps a patient to the same pseudonym in every study and run. Keep it secret and stable."
        ),
    )
    deidentify_destinations: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "DICOMweb stores $deidentify may send to, by name "
            '(JSON: {"research": "https://pacs2/dicom-web"}); a request names one, never a URL.'
        ),
    )
    deidentify_max_instances: int = Field(
        2000, ge=1, description="Largest study $deidentify handles (it runs synchronously)."
    )
    deidentify_timeout: float = Field(60.0, gt=0, description="Seconds per request to a destination store.")
    study_delete_enabled: bool = Field(
        False,
        description="Allow DELETE ImagingStudy/{id}: deletes the study in Orthanc (needs FACADE_ORTHANC_URL)",
    )
    viewer_enabled: bool = Field(
        True,
        description=(
            "Serve the OHIF viewer at /viewer/, configured for the facade's /dicom-web with the signed-in "
            "user's SMART token (ADR 0044); off, /viewer/ is not routed."
        ),
    )
    viewer_dist_dir: Path | None = Field(
        None,
        description=(
            "OHIF's prebuilt dist folder (the npm package @ohif/app's dist/); default: ohif/dist in "
            "FACADE_WEB_APP_VENDOR_DIR (the pinned browser packages scripts/setup.sh installs)."
        ),
    )

    web_app_enabled: bool = Field(
        True,
        description=(
            "Serve the SMART imaging app at /app and, with the built-in authorization server, "
            "register its client `imaging-app` (ADR 0043)."
        ),
    )
    web_app_vendor_dir: Path = Field(
        REPO_WEB_VENDOR,
        description=(
            "The pinned browser packages (web/vendor.json) installed by `bash scripts/setup.sh run`; "
            "default: .web-vendor in the checkout."
        ),
    )

    @model_validator(mode="after")
    def _deidentify_has_a_key(self) -> Settings:
        if self.deidentify_enabled:
            secret = self.deidentify_secret.get_secret_value() if self.deidentify_secret else ""
            if len(secret.encode()) < 16:
                raise ValueError(
                    "FACADE_DEIDENTIFY_ENABLED needs FACADE_DEIDENTIFY_SECRET of at least 16 bytes"
                )
        if self.study_delete_enabled and not self.orthanc_url:
            raise ValueError("FACADE_STUDY_DELETE_ENABLED needs FACADE_ORTHANC_URL (DICOMweb has no delete)")
        for name, url in self.deidentify_destinations.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"FACADE_DEIDENTIFY_DESTINATIONS[{name!r}] must be an http(s) URL")
        return self

    @field_validator(
        "dicomweb_url", "base_url", "orthanc_url", "fhir_upstream_url", "inference_url", "auth_issuer"
    )
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("pacs_modalities")
    @classmethod
    def _dicom_peers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            parse_dicom_peer(entry)
        return value

    @field_validator("remote_pacs_nodes")
    @classmethod
    def _remote_nodes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from fhir_facade.embedded.remote_nodes import parse_remote_node

        for entry in value:
            parse_remote_node(entry)
        return value

    @field_validator("worklist_procedure_map")
    @classmethod
    def _procedure_map(cls, value: Path | None) -> Path | None:
        if value is not None:
            load_concept_maps(value)  # ProcedureMapError (a ValueError) names the file and element
        return value

    @field_validator("worklist_stations")
    @classmethod
    def _stations(cls, value: dict[str, str]) -> dict[str, str]:
        check_stations(value)
        return value

    @field_validator("dicom_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

    # -- the sections: one typed group per area (see SettingsSection) ------------------------------

    @cached_property
    def upstream(self) -> UpstreamSettings | None:
        """The upstream FHIR server, None when FACADE_FHIR_UPSTREAM_URL is not set."""
        return UpstreamSettings.of(self) if self.fhir_upstream_url else None

    @cached_property
    def sync(self) -> SyncSettings:
        return SyncSettings.of(self)

    @cached_property
    def subscription(self) -> SubscriptionSettings:
        return SubscriptionSettings.of(self)

    @cached_property
    def worklist(self) -> WorklistSettings:
        return WorklistSettings.of(self)

    @cached_property
    def inference(self) -> InferenceSettings:
        return InferenceSettings.of(self)

    @cached_property
    def analyze(self) -> AnalyzeSettings:
        return AnalyzeSettings.of(self)

    @cached_property
    def reading(self) -> ReadingSettings:
        return ReadingSettings.of(self)

    @cached_property
    def deidentify(self) -> DeidentifySettings:
        return DeidentifySettings.of(self)

    @cached_property
    def study_delete(self) -> StudyDeleteSettings:
        return StudyDeleteSettings.of(self)

    @cached_property
    def viewer(self) -> ViewerSettings:
        return ViewerSettings.of(self)

    @cached_property
    def web_app(self) -> WebAppSettings:
        return WebAppSettings.of(self)

    @cached_property
    def limits(self) -> LimitsSettings:
        return LimitsSettings.of(self)

    @cached_property
    def imports(self) -> ImportSettings:
        return ImportSettings.of(self)

    @cached_property
    def lockout(self) -> LockoutSettings:
        return LockoutSettings.of(self)

    @cached_property
    def reconcile(self) -> ReconcileSettings:
        return ReconcileSettings.of(self)

    @cached_property
    def remote_pacs(self) -> RemotePacsSettings:
        return RemotePacsSettings.of(self)

    @cached_property
    def replica(self) -> ReplicaSettings:
        return ReplicaSettings.of(self)

    @cached_property
    def replica_name(self) -> str:
        """This process's lease holder name: FACADE_REPLICA_ID, else unique per process start."""
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"

    @cached_property
    def timezone(self) -> ZoneInfo:
        """The zone for DICOM date/times without TimezoneOffsetFromUTC."""
        return ZoneInfo(self.dicom_timezone)

    @property
    def public_root(self) -> str:
        """The server's public root: FACADE_BASE_URL without its trailing /fhir."""
        return self.base_url.removesuffix("/fhir")

    @property
    def builtin_issuer(self) -> bool:
        """Whether the built-in authorization server issues the tokens (auth=smart, no external issuer)."""
        return self.auth == "smart" and self.auth_issuer is None

    @property
    def token_issuer(self) -> str:
        """The 'iss' that tokens must carry."""
        return self.auth_issuer or f"{self.public_root}/auth"

    @property
    def token_audience(self) -> str:
        """The 'aud' that tokens must carry: our FHIR base unless configured."""
        return self.auth_audience or self.base_url

    @property
    def audits(self) -> bool:
        """Whether interactions are recorded as AuditEvents."""
        return self.audit_enabled if self.audit_enabled is not None else self.auth == "smart"

    @property
    def resolved_clients_file(self) -> Path:
        """The built-in authorization server's client and user registry."""
        return self.auth_clients_file or self.data_dir / "auth-clients.json"

    @property
    def pacs_auth(self) -> tuple[str, str] | None:
        """(user, password) for HTTP Basic to the PACS, or None when no user is configured."""
        if self.pacs_username is None:
            return None
        password = self.pacs_password.get_secret_value() if self.pacs_password else ""
        return (self.pacs_username, password)

    @property
    def resolved_database_url(self) -> str:
        """The store URL, defaulting to a SQLite file in the data directory."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'facade.sqlite3').resolve()}"
