"""Cross-study batching (fhir_facade/analyze/batching.py, ADR 0036) with the real model on ONNX
Runtime and real slices (the Colin27 demo study through the real preprocessing): batches are
filled across studies, the result of every slice equals the unbatched one, a small study is not
starved behind a big one, and one study's failure or cancellation leaves the others alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from fhir_facade.analyze.batching import BatchRecord, InferenceBatcher
from fhir_facade.analyze.inference import InferenceError, InferenceUnavailable, OnnxRuntimeBackend
from fhir_facade.analyze.manifest import ModelManifest, load_manifests
from fhir_facade.analyze.pixels import to_model_input
from fhir_facade.demo.brain_mri import build_demo_study

MODEL_ID = "brain-tumor-vgg16"
POISON = -7.0  # a slice filled with this value makes `FaultyBackend` fail


@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    return load_manifests()[MODEL_ID]


@pytest.fixture(scope="module")
def backend(manifest: ModelManifest) -> Iterator[OnnxRuntimeBackend]:
    backend = OnnxRuntimeBackend(manifest, providers=["CPUExecutionProvider"])
    backend.warm_up()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def slices(manifest: ModelManifest) -> np.ndarray:
    """The 24 demo slices as model input, by the production preprocessing."""
    return np.stack([to_model_input(ds, manifest.input) for ds in build_demo_study(n_slices=24)])


@pytest.fixture(scope="module")
def alone(backend: OnnxRuntimeBackend, slices: np.ndarray) -> np.ndarray:
    """Every slice through the model on its own (batch of one): the unbatched reference."""
    return np.concatenate([backend.infer(slices[i : i + 1]) for i in range(len(slices))])


class FaultyBackend:
    """The real model, but a batch holding a slice filled with `POISON` fails, as a backend does
    on input it refuses. A fault injection: the real model accepts any float input, so a failing
    batch cannot be caused otherwise. `unavailable` makes every call fail as a down server."""

    def __init__(self, real: OnnxRuntimeBackend) -> None:
        self.real = real
        self.manifest = real.manifest
        self.unavailable = False
        self.calls: list[int] = []

    @property
    def providers(self) -> tuple[str, ...]:
        return self.real.providers

    def warm_up(self) -> None:
        self.real.warm_up()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if self.unavailable:
            raise InferenceUnavailable("inference server unreachable (injected)")
        if any(np.all(row == POISON) for row in batch):
            raise InferenceError("the model refused a slice (injected)")
        return self.real.infer(batch)

    def close(self) -> None:
        pass


async def test_a_batch_is_filled_from_several_studies(
    backend: OnnxRuntimeBackend, slices: np.ndarray, alone: np.ndarray
) -> None:
    records: list[BatchRecord] = []
    batcher = InferenceBatcher(backend, max_batch=12, max_wait=5.0, on_batch=records.append)
    try:
        parts = {"A": slices[0:4], "B": slices[4:8], "C": slices[8:12]}
        results = await asyncio.gather(*(batcher.infer(key, rows) for key, rows in parts.items()))
    finally:
        await batcher.aclose()
    # 12 slices from 3 studies fill one batch: it ran without waiting out the 5 s.
    assert len(records) == 1
    assert records[0].size == 12
    assert records[0].studies == {"A", "B", "C"}
    assert batcher.stats.batches == 1 and batcher.stats.slices == 12
    # Every slice's probabilities equal the slice's own through the model alone.
    np.testing.assert_allclose(np.concatenate(results), alone[0:12], rtol=0, atol=1e-6)


async def test_a_partial_batch_runs_after_max_wait(backend: OnnxRuntimeBackend, slices: np.ndarray) -> None:
    records: list[BatchRecord] = []
    batcher = InferenceBatcher(backend, max_batch=64, max_wait=0.05, on_batch=records.append)
    try:
        out = await asyncio.wait_for(batcher.infer("A", slices[:2]), timeout=30)
    finally:
        await batcher.aclose()
    assert out.shape == (2, 4)
    assert [r.size for r in records] == [2]


async def test_batched_results_equal_unbatched_across_many_batches(
    backend: OnnxRuntimeBackend, slices: np.ndarray, alone: np.ndarray
) -> None:
    """Six studies of uneven size through batches of 5: rows are split, interleaved and merged
    back, and still every study gets exactly its own slices' probabilities in its order."""
    records: list[BatchRecord] = []
    batcher = InferenceBatcher(backend, max_batch=5, max_wait=0.01, on_batch=records.append)
    bounds = [(0, 1), (1, 6), (6, 9), (9, 17), (17, 19), (19, 24)]
    try:
        results = await asyncio.gather(*(batcher.infer(f"S{a}", slices[a:b]) for a, b in bounds))
    finally:
        await batcher.aclose()
    for (a, b), result in zip(bounds, results, strict=True):
        np.testing.assert_allclose(result, alone[a:b], rtol=0, atol=1e-6)
    assert sum(r.size for r in records) == 24
    assert all(r.size <= 5 for r in records)
    assert max(len(r.studies) for r in records) >= 4  # batches really mix studies


async def test_a_small_study_is_not_starved_behind_a_big_one(
    backend: OnnxRuntimeBackend, slices: np.ndarray, alone: np.ndarray
) -> None:
    records: list[BatchRecord] = []
    batcher = InferenceBatcher(backend, max_batch=6, max_wait=0.0, on_batch=records.append)
    finished: list[str] = []

    async def study(key: str, rows: np.ndarray) -> np.ndarray:
        out = await batcher.infer(key, rows)
        finished.append(key)
        return out

    try:
        big = asyncio.create_task(study("big", slices[:24]))  # queued first: 4 batches of work
        await asyncio.sleep(0)
        small = asyncio.create_task(study("small", slices[12:14]))
        big_out, small_out = await asyncio.gather(big, small)
    finally:
        await batcher.aclose()
    assert finished == ["small", "big"]
    # The small study arrived while the big one's first batch was being formed; FIFO would run
    # all 24 big slices (4 batches) before it, round-robin puts both its slices in the next batch.
    assert records[0].studies == {"big"}
    assert dict(records[1].parts)["small"] == 2
    assert len(records) == 5
    np.testing.assert_allclose(small_out, alone[12:14], rtol=0, atol=1e-6)
    np.testing.assert_allclose(big_out, alone[:24], rtol=0, atol=1e-6)


async def test_one_failing_study_does_not_fail_the_others(
    backend: OnnxRuntimeBackend, slices: np.ndarray, alone: np.ndarray
) -> None:
    faulty = FaultyBackend(backend)
    records: list[BatchRecord] = []
    batcher = InferenceBatcher(faulty, max_batch=12, max_wait=5.0, on_batch=records.append)
    bad = slices[0:4].copy()
    bad[2] = POISON
    try:
        results = await asyncio.gather(
            batcher.infer("good-1", slices[4:8]),
            batcher.infer("bad", bad),
            batcher.infer("good-2", slices[8:12]),
            return_exceptions=True,
        )
    finally:
        await batcher.aclose()
    good_1, failed, good_2 = results
    assert isinstance(failed, InferenceError) and "injected" in str(failed)
    assert isinstance(good_1, np.ndarray) and isinstance(good_2, np.ndarray)
    np.testing.assert_allclose(good_1, alone[4:8], rtol=0, atol=1e-6)
    np.testing.assert_allclose(good_2, alone[8:12], rtol=0, atol=1e-6)
    # The shared batch failed, then each study ran alone; only the good ones were recorded.
    assert faulty.calls == [12, 4, 4, 4]
    assert sorted(tuple(sorted(r.studies)) for r in records) == [("good-1",), ("good-2",)]


async def test_an_unavailable_server_fails_the_batch_without_retries(
    backend: OnnxRuntimeBackend, slices: np.ndarray
) -> None:
    faulty = FaultyBackend(backend)
    faulty.unavailable = True
    batcher = InferenceBatcher(faulty, max_batch=8, max_wait=5.0)
    try:
        results = await asyncio.gather(
            batcher.infer("A", slices[:4]), batcher.infer("B", slices[4:8]), return_exceptions=True
        )
    finally:
        await batcher.aclose()
    assert all(isinstance(r, InferenceUnavailable) for r in results)
    assert faulty.calls == [8]


async def test_a_wrong_shape_is_refused_for_that_caller_only(
    backend: OnnxRuntimeBackend, slices: np.ndarray, alone: np.ndarray
) -> None:
    batcher = InferenceBatcher(backend, max_batch=4, max_wait=0.01)
    try:
        with pytest.raises(ValueError, match="expects"):
            await batcher.infer("bad", slices[:2, :100])
        out = await batcher.infer("good", slices[:2])
    finally:
        await batcher.aclose()
    np.testing.assert_allclose(out, alone[:2], rtol=0, atol=1e-6)


async def test_a_cancelled_study_leaves_the_queue(
    backend: OnnxRuntimeBackend, slices: np.ndarray, alone: np.ndarray
) -> None:
    records: list[BatchRecord] = []
    batcher = InferenceBatcher(backend, max_batch=2, max_wait=0.0, on_batch=records.append)
    try:
        first = asyncio.create_task(batcher.infer("first", slices[:2]))
        doomed = asyncio.create_task(batcher.infer("doomed", slices[2:22]))
        await asyncio.sleep(0)
        doomed.cancel()
        kept = await batcher.infer("kept", slices[22:24])
        await first
        with pytest.raises(asyncio.CancelledError):
            await doomed
    finally:
        await batcher.aclose()
    np.testing.assert_allclose(kept, alone[22:24], rtol=0, atol=1e-6)
    # At most the one batch that was already running held the cancelled study's slices.
    assert sum(n for r in records for key, n in r.parts if key == "doomed") <= 2
    assert batcher.stats.slices <= 6


async def test_a_closed_batcher_refuses(backend: OnnxRuntimeBackend, slices: np.ndarray) -> None:
    batcher = InferenceBatcher(backend)
    await batcher.aclose()
    with pytest.raises(InferenceError, match="closed"):
        await batcher.infer("A", slices[:1])
