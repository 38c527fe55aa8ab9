"""One analysis, end to end: study -> applicable images -> model -> decision -> SR + FHIR, stored.

Order of effects, chosen so a failure leaves nothing half-written (ADR 0006):
1. read the live ImagingStudy (404 if the PACS does not have it) and select the images;
2. stream them over WADO-RS in batches through the model (off the event loop), within the time
   limit; decoding runs in the analyzer's bounded pool and the slices of concurrent analyses share
   model batches (`batching`, ADR 0036);
3. build every FHIR resource and validate it; build the SR (its evidence: pixel-free headers
   kept while the images streamed);
4. store the SR in the PACS (STOW-RS) as a new series numbered 9901 and up
   (`sr_series_number`), naming the SRs of the results it supersedes in its Predecessor Documents
   Sequence (`supersede`, ADR 0031);
5. store Device, Observations, DiagnosticReport, Provenance, the finished Task and the superseded
   reports and Observations (status `cancelled`) in ONE database transaction.
With FACADE_ANALYZE_SALIENCY on, a positive result's key image is run through the model again with
squares hidden (`saliency`), after the decision and before 3; its Parametric Map and the
Segmentation of its most salient region are stored with the SR in 4, in the next two series
(`saliency_dicom`, `saliency_seg`, ADR 0035).
Between 2 and 3 the applicability step (`applicability`, ADR 0031) leaves the slices the model
cannot assess out of the decision. A failure in 1-4 stores nothing in the database; a failure in 5
leaves only the SR in the PACS (logged): a derived object no report points at, which a repeated
analysis does not name as a predecessor (only SRs of stored reports are).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from fhir_facade.analyze.applicability import SliceFacts, exclusions, slice_geometry, tissue_fractions
from fhir_facade.analyze.batching import BatchRecord, InferenceBatcher
from fhir_facade.analyze.codes import label_concepts
from fhir_facade.analyze.decision import decide, not_assessed
from fhir_facade.analyze.dicom_sr import build_analysis_sr, evidence_header, sr_retrieve_url
from fhir_facade.analyze.errors import ai_inference_timeout, fhir_mapping_error
from fhir_facade.analyze.fhir_report import (
    AnalysisContext,
    AnalysisResources,
    SaliencyReference,
    SrReference,
    build_resources,
)
from fhir_facade.analyze.inference import InferenceBackend, InferenceError, InferenceUnavailable
from fhir_facade.analyze.manifest import ModelManifest
from fhir_facade.analyze.pixels import (
    InstanceRef,
    NoApplicableImages,
    SeriesSelection,
    UndecodableImage,
    iter_batches,
    select_for_study,
    to_model_input,
)
from fhir_facade.analyze.result import AnalysisResult, ExcludedInstance, ScoredInstance
from fhir_facade.analyze.saliency import OcclusionGrid, SaliencyOptions, key_instance, occlusion_sensitivity
from fhir_facade.analyze.saliency_dicom import build_saliency_map, render_overlay_png
from fhir_facade.analyze.saliency_seg import HALF_MAXIMUM, build_saliency_segmentation
from fhir_facade.analyze.sr_series_number import study_next_series_number
from fhir_facade.analyze.supersede import PreviousResult, current_results, superseded
from fhir_facade.analyze.task_narrative import with_analysis_task_narrative
from fhir_facade.auth.access import on_server_authority
from fhir_facade.dicom_to_fhir.uids import uid_from_identifier
from fhir_facade.dicomweb.client import DicomwebClient, DicomwebError, DicomwebUnavailable
from fhir_facade.dicomweb.outcomes import dicom_service_unavailable
from fhir_facade.dicomweb.stow import StowClient
from fhir_facade.dicomweb.wado import WadoClient
from fhir_facade.fhir.errors import (
    FhirError,
    Issue,
    bad_request,
    conflict,
    unprocessable,
)
from fhir_facade.fhir.pipeline import Origin, origin_scope
from fhir_facade.fhir.provider import ResourceProvider
from fhir_facade.store import ResourceStore

__all__ = ["AnalysisOutcome", "Analyzer", "Progress"]

log = logging.getLogger(__name__)

#: Called with (images done, images in total) as the analysis advances.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _Scored:
    """What the model pass produced: per-image outputs, the seconds spent in the model, a
    pixel-free header of every image (the SR's evidence) and each image's tissue share (the
    applicability step's input; empty when the step is off)."""

    instances: list[ScoredInstance]
    inference_seconds: float
    headers: list[pydicom.Dataset]
    tissue: dict[str, float]


@dataclass(frozen=True)
class _KeyImageSaliency:
    """The occlusion map of the key image (ADR 0035), before it becomes DICOM and FHIR."""

    key: ScoredInstance
    source: pydicom.Dataset
    plane: np.ndarray
    """One channel of the model input: the image as the model saw it, for the PNG."""
    grid: OcclusionGrid


@dataclass(frozen=True)
class AnalysisOutcome:
    """The stored result: the report, the other resources, and what was measured."""

    report: dict[str, Any]
    resources: AnalysisResources
    result: AnalysisResult
    seconds: float


class Analyzer:
    """Runs analyses with warm inference backends, shared PACS clients and the store.

    `link_base` is the DICOMweb base of the SR's `presentedForm.url`: the facade's proxy, so the
    caller downloads the SR with its own token (ADR 0016), not the PACS the clients write to.
    """

    def __init__(
        self,
        *,
        manifests: dict[str, ModelManifest],
        backends: dict[str, InferenceBackend],
        default_model: str,
        studies: ResourceProvider,
        qido: DicomwebClient,
        wado: WadoClient,
        stow: StowClient | None,
        writers: Mapping[str, ResourceProvider],
        atomic: Callable[[], AbstractAsyncContextManager[None]],
        link_base: str,
        timeout: float | None = None,
        slice_applicability: bool = True,
        saliency: SaliencyOptions | None = None,
        max_batch: int = 8,
        max_wait: float = 0.005,
        decode_workers: int = 2,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        """`max_batch`, `max_wait`: the shared batches of each model (ADR 0036); `decode_workers`:
        the threads that decode and preprocess images for all analyses; `on_batch` sees every
        model call (which studies' slices it held), for metrics and tests."""
        self.manifests = manifests
        self.backends = backends
        self.default_model = default_model
        self._studies = studies
        self._qido = qido
        self._wado = wado
        self._stow = stow
        self._writers = writers  # the pipelined providers
        self._atomic = atomic
        self._link_base = link_base
        self._timeout = timeout
        self._slice_applicability = slice_applicability
        self._saliency = saliency
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._on_batch = on_batch
        self.batchers: dict[str, InferenceBatcher] = {}
        self._decode = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")
        # One result finished at a time (SR series number taken, SR stored, resources written), so
        # two results of one study finishing together in this process neither take the same number
        # nor miss each other when the later one supersedes the earlier (ADR 0031).
        self._finishing = asyncio.Lock()

    def batcher(self, model_id: str) -> InferenceBatcher:
        """The model's shared batcher, made on first use on the running event loop."""
        batcher = self.batchers.get(model_id)
        if batcher is None:
            batcher = InferenceBatcher(
                self.backends[model_id],
                max_batch=self._max_batch,
                max_wait=self._max_wait,
                on_batch=self._on_batch,
            )
            self.batchers[model_id] = batcher
        return batcher

    async def aclose(self) -> None:
        """Stop the batchers (waiting callers get `InferenceError`) and the decoding pool."""
        batchers, self.batchers = list(self.batchers.values()), {}
        for batcher in batchers:
            await batcher.aclose()
        self._decode.shutdown(wait=False, cancel_futures=True)

    def manifest(self, model_id: str | None) -> ModelManifest:
        model_id = model_id or self.default_model
        manifest = self.manifests.get(model_id)
        if manifest is None:
            known = ", ".join(sorted(self.manifests))
            raise FhirError(
                400,
                [
                    _issue(
                        "code-invalid",
                        f"Unknown model {model_id!r} (this server has: {known})",
                        "unknown_model",
                    )
                ],
            )
        return manifest

    async def analyze(
        self,
        study_id: str,
        *,
        model_id: str | None = None,
        series_uid: str | None = None,
        progress: Progress | None = None,
        task: dict[str, Any] | None = None,
        study: dict[str, Any] | None = None,
    ) -> AnalysisOutcome:
        """Run the model on the study and store the result (with `task` completed, if given).
        `study` is the live ImagingStudy when the caller has just read it."""
        started = time.perf_counter()
        phases: dict[str, float] = {}
        mark = started

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = now - mark
            mark = now

        manifest = self.manifest(model_id)
        if study is None or study.get("id") != study_id:
            study = await self._studies.read(study_id)  # FhirError 404 for an unknown study
        study_uid = _study_uid(study)
        limit = self._timeout or manifest.timeout_s
        try:
            async with asyncio.timeout(limit):
                selections = await self._select(study_uid, manifest, series_uid)
                lap("select")
                scored = await self._run_model(study_uid, manifest, selections, progress)
                lap("model")
        except TimeoutError as exc:
            raise ai_inference_timeout(
                f"Analysis of study {study_uid} with {manifest.id} ran past its limit of {limit:g} s"
            ) from exc
        result = self._result(study_uid, manifest, scored)
        lap("decision")
        key_saliency = await self._key_image_saliency(manifest, result, limit) if self._stow else None
        if self._saliency is not None:
            lap("saliency")
        async with self._finishing:
            previous = await current_results(self._writers, study["id"], result)
            lap("previous")
            sr_dataset, sr_ref, saliency_objects, saliency_ref = (
                await self._build_sr(study_uid, result, scored.headers, previous, key_saliency)
                if self._stow
                else (None, None, [], None)
            )
            lap("sr")
            resources = self._resources(result, study, sr_ref, previous, saliency_ref)
            lap("fhir")
            if sr_dataset is not None and self._stow is not None:
                await self._store_sr(study_uid, [*saliency_objects, sr_dataset])
            lap("stow")
            completed_task = _completed_task(task, resources) if task else None
            task_version = str(task.get("meta", {}).get("versionId", "")) if task else ""
            await self._persist(resources, completed_task, task_version or None, previous)
            lap("store")
        seconds = time.perf_counter() - started
        log.info(
            "Analyzed study %s with %s: %s (%.2f) -> DiagnosticReport/%s%s, from %d images (%d excluded) "
            "in %.2f s (inference %.2f s; %s)%s",
            study_uid,
            manifest.id,
            result.decision.label,
            result.decision.probability,
            resources.report["id"],
            f" + SR series {sr_dataset.SeriesNumber}" if sr_dataset is not None else "",
            len(result.instances),
            len(result.excluded),
            seconds,
            result.inference_seconds,
            ", ".join(f"{name} {value:.3f}" for name, value in phases.items()),
            "".join(f"; supersedes DiagnosticReport/{p.report_id}" for p in previous),
        )
        return AnalysisOutcome(resources.report, resources, result, seconds)

    # -- pipeline steps -----------------------------------------------------------------------

    async def _select(
        self, study_uid: str, manifest: ModelManifest, series_uid: str | None
    ) -> list[SeriesSelection]:
        try:
            return await select_for_study(self._qido, study_uid, manifest.applies_to, series_uid=series_uid)
        except NoApplicableImages as exc:
            raise unprocessable(str(exc), detail_code="no_applicable_images") from exc
        except DicomwebUnavailable as exc:
            raise dicom_service_unavailable(f"The PACS did not answer: {exc}") from exc

    async def _run_model(
        self,
        study_uid: str,
        manifest: ModelManifest,
        selections: Sequence[SeriesSelection],
        progress: Progress | None,
    ) -> _Scored:
        """Per-image outputs, seconds spent in the model, a pixel-free header of every image (the
        SR's evidence) and, with the applicability step on, each image's tissue share."""
        batcher = self.batcher(manifest.id)
        rules = manifest.slice_applicability if self._slice_applicability else None
        tissue: dict[str, float] = {}
        headers: list[pydicom.Dataset] = []
        total = sum(len(s.instances) for s in selections)
        scored: list[ScoredInstance] = []
        inference_seconds = 0.0
        # Chunks handed to the batcher and not answered yet: enough to fill a shared batch, so one
        # study alone still gets full batches while the next chunks are fetched and decoded.
        window = max(1, math.ceil(self._max_batch / manifest.batch_size))
        pending: deque[tuple[str, list[InstanceRef], np.ndarray, asyncio.Task[tuple[np.ndarray, float]]]]
        pending = deque()

        async def finish_oldest() -> None:
            nonlocal inference_seconds
            series_uid, refs, batch, answer = pending[0]
            outputs, seconds = await answer
            pending.popleft()
            inference_seconds += seconds
            if rules is not None:
                fractions = tissue_fractions(batch, manifest.input, rules.tissue_threshold)
                tissue.update(zip((r.sop_instance_uid for r in refs), fractions, strict=True))
            for ref, row in zip(refs, outputs, strict=True):
                scored.append(
                    ScoredInstance(
                        series_uid=series_uid,
                        sop_instance_uid=ref.sop_instance_uid,
                        sop_class_uid=ref.sop_class_uid,
                        instance_number=ref.instance_number,
                        probabilities=tuple(float(p) for p in row),
                    )
                )
            if progress:
                progress(len(scored), total)

        if progress:
            progress(0, total)
        try:
            for selection in selections:
                batches = iter_batches(
                    self._wado,
                    selection,
                    manifest.input,
                    manifest.batch_size,
                    on_dataset=lambda ds: headers.append(evidence_header(ds)),
                    executor=self._decode,
                )
                async with aclosing(batches):
                    async for refs, batch in batches:
                        answer = asyncio.ensure_future(batcher.infer_with_share(study_uid, batch))
                        pending.append((selection.series_uid, refs, batch, answer))
                        while len(pending) > window or (pending and pending[0][3].done()):
                            await finish_oldest()
            while pending:
                await finish_oldest()
        except DicomwebUnavailable as exc:
            raise dicom_service_unavailable(
                f"The PACS did not answer while images were fetched: {exc}"
            ) from exc
        except DicomwebError as exc:
            raise unprocessable(
                f"The PACS could not deliver the images of study {study_uid}: {exc}",
                detail_code="dicom_service_error",
            ) from exc
        except UndecodableImage as exc:
            raise unprocessable(str(exc), detail_code="image_decode_error") from exc
        except InferenceUnavailable as exc:
            raise FhirError(
                503,
                [
                    _issue(
                        "transient", f"The inference server did not answer: {exc}", "ai_inference_unavailable"
                    )
                ],
                {"Retry-After": "5"},
            ) from exc
        except InferenceError as exc:
            raise FhirError(
                500, [_issue("exception", f"Inference failed: {exc}", "ai_inference_error")]
            ) from exc
        finally:
            # On a failure or a cancellation the chunks still queued leave the batcher.
            for *_, answer in pending:
                answer.cancel()
            if pending:
                await asyncio.gather(*(answer for *_, answer in pending), return_exceptions=True)
        return _Scored(scored, inference_seconds, headers, tissue)

    def _excluded(self, manifest: ModelManifest, scored: _Scored) -> list[ExcludedInstance]:
        """The applicability step (ADR 0031): the images the model cannot assess, with reasons."""
        rules = manifest.slice_applicability
        if rules is None or not self._slice_applicability:
            return []
        heights = {str(h.SOPInstanceUID): slice_geometry(h) for h in scored.headers}
        facts = {
            uid: SliceFacts(tissue_fraction=fraction, z_mm=heights.get(uid))
            for uid, fraction in scored.tissue.items()
        }
        return exclusions(scored.instances, facts, rules)

    def _result(self, study_uid: str, manifest: ModelManifest, scored: _Scored) -> AnalysisResult:
        instances = scored.instances
        try:
            excluded = self._excluded(manifest, scored)
            left_out = {item.instance.sop_instance_uid for item in excluded}
            assessed = [i for i in instances if i.sop_instance_uid not in left_out]
            concepts = label_concepts(manifest)
            labels = manifest.output.labels
            decision = (
                decide(assessed, labels, manifest.output.negative_label, concepts)
                if assessed
                else not_assessed(labels, concepts, len(excluded))
            )
        except Exception as exc:  # a packaging error of the model, not the caller's fault
            log.exception("Result mapping failed for study %s", study_uid)
            raise fhir_mapping_error(f"The model's output could not be mapped: {exc}") from exc
        return AnalysisResult(
            study_uid=study_uid,
            model_id=manifest.id,
            model_version=manifest.version,
            model_title=manifest.title,
            model_sha256=manifest.sha256,
            labels=manifest.output.labels,
            instances=tuple(instances),
            decision=decision,
            inference_seconds=scored.inference_seconds,
            providers=self.backends[manifest.id].providers,
            excluded=tuple(excluded),
        )

    async def _build_sr(
        self,
        study_uid: str,
        result: AnalysisResult,
        evidence: list[pydicom.Dataset],
        previous: Sequence[PreviousResult],
        key_saliency: _KeyImageSaliency | None = None,
    ) -> tuple[pydicom.Dataset, SrReference, list[pydicom.Dataset], SaliencyReference | None]:
        """The SR and, with a key image saliency, its Parametric Map (the SR's series number + 1,
        so the map is listed right after the SR it belongs to) and the Segmentation of the map's
        most salient region (+ 2), if the map has one."""
        series_uid, sop_uid = generate_uid(), generate_uid()
        try:
            series_number = await study_next_series_number(self._qido, study_uid)
        except DicomwebUnavailable as exc:
            raise dicom_service_unavailable(f"The PACS did not answer: {exc}") from exc
        except DicomwebError as exc:
            raise FhirError(
                502,
                [
                    _issue(
                        "exception",
                        f"The PACS could not list the study's series: {exc}",
                        "dicom_service_error",
                    )
                ],
            ) from exc
        saliency_map, saliency_region, saliency_ref = None, None, None
        if key_saliency is not None:
            saliency_map, saliency_region, saliency_ref = await self._build_saliency(
                study_uid, result, key_saliency, series_number + 1
            )
        try:
            dataset = await asyncio.to_thread(
                build_analysis_sr,
                result,
                evidence,
                series_uid=series_uid,
                sop_instance_uid=sop_uid,
                series_number=series_number,
                predecessors=[p.sr for p in previous if p.sr is not None],
                saliency_map=saliency_map,
                saliency_region=saliency_region,
            )
        except Exception as exc:
            log.exception("DICOM SR could not be built for study %s", study_uid)
            raise fhir_mapping_error(f"The DICOM SR of the result could not be built: {exc}") from exc
        url = sr_retrieve_url(self._link_base, study_uid, series_uid, sop_uid)
        saliency_objects = [ds for ds in (saliency_map, saliency_region) if ds is not None]
        return dataset, SrReference(sop_uid, series_uid, url), saliency_objects, saliency_ref

    async def _key_image_saliency(
        self, manifest: ModelManifest, result: AnalysisResult, limit: float
    ) -> _KeyImageSaliency | None:
        """The occlusion map of a positive result's key image (ADR 0035), with the analysis's own
        backend and preprocessing, or None (setting off, no finding, or it failed: the map is
        extra evidence, so a failure is logged and the result goes on without it)."""
        options = self._saliency
        key = key_instance(result, manifest.output.negative_label) if options else None
        if options is None or key is None:
            return None
        backend = self.backends[manifest.id]
        class_index = manifest.output.labels.index(result.decision.label)
        try:
            async with asyncio.timeout(limit):
                source = await self._wado.retrieve_instance(
                    result.study_uid, key.series_uid, key.sop_instance_uid
                )
                tensor = await asyncio.to_thread(to_model_input, source, manifest.input)
                grid = await asyncio.to_thread(
                    occlusion_sensitivity,
                    backend.infer,
                    tensor,
                    manifest.input,
                    class_index,
                    patch=options.patch,
                    stride=options.stride,
                    batch_size=manifest.batch_size,
                )
        except (TimeoutError, DicomwebError, UndecodableImage, InferenceError) as exc:
            log.warning("No saliency map for study %s: %s", result.study_uid, exc)
            return None
        plane = tensor[..., 0] if manifest.input.layout == "NHWC" else tensor[0]
        return _KeyImageSaliency(key, source, plane, grid)

    async def _build_saliency(
        self, study_uid: str, result: AnalysisResult, key_saliency: _KeyImageSaliency, series_number: int
    ) -> tuple[pydicom.Dataset, pydicom.Dataset | None, SaliencyReference]:
        """The Parametric Map (`series_number`), the Segmentation of its salient region
        (`series_number` + 1, None when the map has no positive value) and their reference."""
        assert self._saliency is not None
        series_uid, sop_uid = generate_uid(), generate_uid()
        region_series_uid, region_uid = generate_uid(), generate_uid()
        concept = result.decision.concept
        try:
            dataset = await asyncio.to_thread(
                build_saliency_map,
                key_saliency.source,
                key_saliency.grid,
                concept,
                series_uid=series_uid,
                sop_instance_uid=sop_uid,
                series_number=series_number,
                model_id=result.model_id,
                patch=self._saliency.patch,
                stride=self._saliency.stride,
            )
            region = await asyncio.to_thread(
                build_saliency_segmentation,
                key_saliency.source,
                key_saliency.grid,
                concept,
                series_uid=region_series_uid,
                sop_instance_uid=region_uid,
                series_number=series_number + 1,
                model_id=result.model_id,
                model_version=result.model_version,
            )
            png = await asyncio.to_thread(
                render_overlay_png, key_saliency.source, key_saliency.plane, key_saliency.grid
            )
        except Exception as exc:
            log.exception("The saliency map could not be built for study %s", study_uid)
            raise fhir_mapping_error(f"The saliency map of the result could not be built: {exc}") from exc
        key = key_saliency.key
        reference = SaliencyReference(
            sop_instance_uid=sop_uid,
            retrieve_url=sr_retrieve_url(self._link_base, study_uid, series_uid, sop_uid),
            key_sop_instance_uid=key.sop_instance_uid,
            key_instance_number=key.instance_number,
            concept=concept,
            png=png,
            method=(
                f"occlusion sensitivity, drop of the class log-odds when a {self._saliency.patch}-pixel "
                f"square of the model input is hidden, stride {self._saliency.stride} "
                f"({key_saliency.grid.passes} occluded copies)"
            ),
            region_sop_instance_uid=region_uid if region is not None else None,
            region_retrieve_url=(
                sr_retrieve_url(self._link_base, study_uid, region_series_uid, region_uid)
                if region is not None
                else None
            ),
            region_rule=f"where the map is at least {HALF_MAXIMUM:g} x its maximum",
        )
        return dataset, region, reference

    async def _store_sr(self, study_uid: str, datasets: list[pydicom.Dataset]) -> None:
        assert self._stow is not None
        try:
            await self._stow.store(datasets, study_uid=study_uid)
        except DicomwebUnavailable as exc:
            raise dicom_service_unavailable(f"The PACS did not accept the result SR: {exc}") from exc
        except DicomwebError as exc:
            raise FhirError(
                502,
                [_issue("exception", f"The PACS rejected the result SR: {exc}", "dicom_service_error")],
            ) from exc

    def _resources(
        self,
        result: AnalysisResult,
        study: dict[str, Any],
        sr: SrReference | None,
        previous: Sequence[PreviousResult],
        saliency: SaliencyReference | None = None,
    ) -> AnalysisResources:
        issued = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        context = AnalysisContext(
            study_reference=f"ImagingStudy/{study['id']}",
            subject=_plain_reference(study.get("subject")),
            based_on=tuple(ref for ref in (_plain_reference(r) for r in study.get("basedOn", [])) if ref),
            started=study.get("started"),
            issued=issued,
            report_id=uuid.uuid4().hex,
            observation_id=uuid.uuid4().hex,
            provenance_id=uuid.uuid4().hex,
            sr=sr,
            study_description=study.get("description"),
            accession_number=_accession_number(study),
            replaces=tuple(f"DiagnosticReport/{p.report_id}" for p in previous),
            saliency=saliency,
        )
        try:
            resources = build_resources(result, context)
            for resource in resources.all():
                ResourceStore.validate(resource)
        except FhirError as exc:
            log.error("Invalid FHIR built for study %s: %s", result.study_uid, exc)
            raise fhir_mapping_error(f"The result is not valid FHIR: {exc}") from exc
        except Exception as exc:
            log.exception("FHIR mapping failed for study %s", result.study_uid)
            raise fhir_mapping_error(f"The result could not be expressed as FHIR: {exc}") from exc
        return resources

    async def _persist(
        self,
        resources: AnalysisResources,
        task: dict[str, Any] | None,
        task_version: str | None,
        previous: Sequence[PreviousResult] = (),
    ) -> None:
        """Everything of one result in one transaction: all stored, or none, the superseded
        reports and their Observations set to `cancelled` in the same one (ADR 0031). Written
        through the pipeline as the server's own work (the job was authorized before it ran), so
        the result's consumers (outbox, subscriptions) hear of each resource after the commit.

        The finished Task is written last, with If-Match on `task_version`, the version the job was
        started or claimed at: when the job's replica was thought dead and another replica took the
        Task over (a new version, ADR 0032), this result is refused whole (409), so one Task never
        gets two reports."""
        writes = [*resources.observations, resources.report, resources.provenance]
        for result in previous:
            writes.extend(superseded(result, f"DiagnosticReport/{resources.report['id']}"))
        with on_server_authority(), origin_scope(Origin.INTERNAL):
            async with self._atomic():
                if not await self._exists(resources.device):
                    writes.insert(0, resources.device)
                for resource in writes:
                    writer = self._writers[resource["resourceType"]]
                    await writer.update(resource["id"], resource, if_match=None)
                if task is not None:  # last; its refusal rolls back everything above
                    try:
                        await self._writers["Task"].update(
                            task["id"], task, if_match=f'W/"{task_version}"' if task_version else None
                        )
                    except FhirError as error:
                        if error.status != 412:
                            raise
                        raise conflict(
                            f"Analysis Task {task['id']} was taken over by another replica; "
                            "this run's result is not stored"
                        ) from error

    async def _exists(self, resource: dict[str, Any]) -> bool:
        try:
            await self._writers[resource["resourceType"]].read(resource["id"])
        except FhirError as error:
            if error.status in (404, 410):
                return False
            raise
        return True


def _issue(code: str, diagnostics: str, detail_code: str) -> Issue:
    return Issue(code, diagnostics, detail_code=detail_code)


def _study_uid(study: dict[str, Any]) -> str:
    for identifier in study.get("identifier", []):
        uid = uid_from_identifier(identifier)
        if uid is not None:
            return uid
    raise bad_request(f"ImagingStudy/{study.get('id')} has no DICOM Study Instance UID")


def _accession_number(study: dict[str, Any]) -> str | None:
    """The study's accession number: its identifier of type v2-0203 ACSN (DICOMcast convention)."""
    for identifier in study.get("identifier", []):
        codes = [c.get("code") for c in identifier.get("type", {}).get("coding", [])]
        if "ACSN" in codes and identifier.get("value"):
            return str(identifier["value"])
    return None


def _plain_reference(reference: Any) -> dict[str, Any] | None:
    """A Reference as stored resources carry it: literal reference (+ identifier, display)."""
    if not isinstance(reference, dict) or not reference.get("reference"):
        return None
    keep = ("reference", "type", "identifier", "display")
    return {key: reference[key] for key in keep if key in reference}


def _completed_task(task: dict[str, Any], resources: AnalysisResources) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    completed = {
        **task,
        "status": "completed",
        "lastModified": now,
        "output": [
            {
                "type": {"text": "DiagnosticReport"},
                "valueReference": {"reference": f"DiagnosticReport/{resources.report['id']}"},
            }
        ],
    }
    completed.pop("meta", None)
    return with_analysis_task_narrative(completed)
