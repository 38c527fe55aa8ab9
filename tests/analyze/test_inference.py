"""Inference backends against the real model: ONNX Runtime in process, and a real KServe v2 server
(kserve's ModelServer in its own virtualenv, .venv-kserve, made by scripts/setup.sh)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from fhir_facade.analyze.inference import (
    DEFAULT_PROVIDERS,
    InferenceError,
    InferenceUnavailable,
    KServeV2Backend,
    ModelContractError,
    OnnxRuntimeBackend,
    choose_providers,
    create_backend,
)
from fhir_facade.analyze.manifest import ModelManifest, ModelSourceError, load_manifests
from fhir_facade.config import Settings
from fhir_facade.demo.brain_mri import build_demo_study
from fhir_facade.embedded import free_port

REPO = Path(__file__).resolve().parents[2]
KSERVE_PYTHON = REPO / ".venv-kserve" / "bin" / "python"
KSERVE_SERVER = REPO / "tests" / "kserve_server" / "onnx_model_server.py"
MODEL_ID = "brain-tumor-vgg16"


def _manifest_with(manifest: ModelManifest, **changes: Any) -> ModelManifest:
    """A validated copy of `manifest` with top-level or nested (`input`, `output`) changes."""
    data = manifest.model_dump()
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ModelManifest.model_validate(data)


def _model_input(ds: Dataset, manifest: ModelManifest) -> np.ndarray:
    """One slice as the model sees it: DICOM window to [0, 1], resize, repeat to 3 channels (NHWC).

    Deliberately simple and inline: this tests the backends, not the pixel pipeline.
    """
    pixels = ds.pixel_array.astype(np.float32)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    windowed = np.clip((pixels - (center - width / 2)) / width, 0.0, 1.0).astype(np.float32)
    size = (manifest.input.width, manifest.input.height)
    resized = np.asarray(Image.fromarray(windowed, mode="F").resize(size, Image.Resampling.BILINEAR))
    return np.repeat(resized[..., None], manifest.input.channels, axis=2)


@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    return load_manifests()[MODEL_ID]


@pytest.fixture(scope="module")
def ort_backend(manifest: ModelManifest) -> Iterator[OnnxRuntimeBackend]:
    backend = OnnxRuntimeBackend(manifest)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def brain_batch(manifest: ModelManifest) -> np.ndarray:
    """Four adjacent mid-brain axial slices of the demo study (Colin27, a healthy brain)."""
    study = build_demo_study(n_slices=24)
    return np.stack([_model_input(ds, manifest) for ds in study[10:14]])


# --- ONNX Runtime ---------------------------------------------------------------------------------


def test_probabilities_one_row_per_slice(
    ort_backend: OnnxRuntimeBackend, brain_batch: np.ndarray, manifest: ModelManifest
) -> None:
    out = ort_backend.infer(brain_batch)
    assert out.shape == (4, len(manifest.output.labels))
    assert out.dtype == np.float32
    assert ((out >= 0) & (out <= 1)).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_deterministic(ort_backend: OnnxRuntimeBackend, brain_batch: np.ndarray) -> None:
    np.testing.assert_array_equal(ort_backend.infer(brain_batch[:2]), ort_backend.infer(brain_batch[:2]))


def test_batch_of_one_equals_row_of_batch(ort_backend: OnnxRuntimeBackend, brain_batch: np.ndarray) -> None:
    together = ort_backend.infer(brain_batch)
    for i in (0, 3):
        alone = ort_backend.infer(brain_batch[i : i + 1])
        np.testing.assert_allclose(alone[0], together[i], atol=1e-5)


def test_healthy_brain_slice_is_notumor(
    ort_backend: OnnxRuntimeBackend, brain_batch: np.ndarray, manifest: ModelManifest
) -> None:
    out = ort_backend.infer(brain_batch[1:3])
    labels = [manifest.output.labels[i] for i in out.argmax(axis=1)]
    assert labels == ["notumor", "notumor"], out
    assert (out[:, manifest.output.labels.index("notumor")] > 0.9).all(), out


def test_concurrent_infer_from_threads(ort_backend: OnnxRuntimeBackend, brain_batch: np.ndarray) -> None:
    expected = [ort_backend.infer(brain_batch[i : i + 1]) for i in (0, 1)]
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        results[i] = ort_backend.infer(brain_batch[i : i + 1])

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in (0, 1):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-6)


def test_warm_up_runs_one_batch(ort_backend: OnnxRuntimeBackend) -> None:
    ort_backend.warm_up()


def test_logits_get_a_softmax(manifest: ModelManifest, brain_batch: np.ndarray) -> None:
    # The model emits probabilities; declared as logits, the backend must softmax them.
    as_logits = _manifest_with(manifest, output={"kind": "logits"})
    backend = OnnxRuntimeBackend(as_logits, providers=["CPUExecutionProvider"])
    raw = OnnxRuntimeBackend(manifest, providers=["CPUExecutionProvider"]).infer(brain_batch[:1])
    out = backend.infer(brain_batch[:1])
    expected = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_wrong_batch_shape_is_refused(ort_backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(ValueError, match=r"expects \(N, \*\(240, 240, 3\)\)"):
        ort_backend.infer(np.zeros((1, 3, 240, 240), dtype=np.float32))


def test_closed_backend_refuses(manifest: ModelManifest) -> None:
    backend = OnnxRuntimeBackend(manifest, providers=["CPUExecutionProvider"], threads=1)
    backend.close()
    with pytest.raises(InferenceError, match="closed"):
        backend.infer(np.zeros((1, 240, 240, 3), dtype=np.float32))


# Provider choice: unavailable providers are dropped (with a warning when they were asked for
# explicitly); if none is left, InferenceError names the available ones.


def test_default_providers_fall_back_to_cpu_without_cuda(
    manifest: ModelManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Patched only so that a CUDA build of onnxruntime also exercises "CUDA missing".
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    backend = OnnxRuntimeBackend(manifest)
    assert backend.providers == ("CPUExecutionProvider",)


def test_default_providers_keep_what_is_installed() -> None:
    available = ort.get_available_providers()
    assert choose_providers() == [name for name in DEFAULT_PROVIDERS if name in available]


def test_unavailable_requested_provider_is_dropped_with_a_warning(
    manifest: ModelManifest, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fhir_facade.analyze.inference"):
        backend = OnnxRuntimeBackend(manifest, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert backend.providers == ("CPUExecutionProvider",)
    assert "NoSuchExecutionProvider" in caplog.text


def test_only_unavailable_providers_is_an_error() -> None:
    with pytest.raises(InferenceError, match="none of the ONNX Runtime providers"):
        choose_providers(["NoSuchExecutionProvider"])


def test_sha256_mismatch_is_a_model_source_error(manifest: ModelManifest) -> None:
    tampered = _manifest_with(manifest, sha256="0" * 64)
    with pytest.raises(ModelSourceError, match="sha256"):
        OnnxRuntimeBackend(tampered)


def test_wrong_input_name_is_a_contract_error(manifest: ModelManifest) -> None:
    with pytest.raises(ModelContractError, match="no input 'pixels'"):
        OnnxRuntimeBackend(_manifest_with(manifest, input={"name": "pixels"}))


def test_wrong_output_name_is_a_contract_error(manifest: ModelManifest) -> None:
    with pytest.raises(ModelContractError, match="no output 'probs'"):
        OnnxRuntimeBackend(_manifest_with(manifest, output={"name": "probs"}))


def test_wrong_label_count_is_a_contract_error(manifest: ModelManifest) -> None:
    five = (*manifest.output.labels, "other")
    with pytest.raises(ModelContractError, match="dense_3"):
        OnnxRuntimeBackend(_manifest_with(manifest, output={"labels": five}))


def test_wrong_input_size_is_a_contract_error(manifest: ModelManifest) -> None:
    with pytest.raises(ModelContractError, match="'input'"):
        OnnxRuntimeBackend(_manifest_with(manifest, input={"height": 224, "width": 224}))


def test_create_backend_follows_settings(manifest: ModelManifest) -> None:
    backend = create_backend(manifest, Settings(inference_providers=("CPUExecutionProvider",)))
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.providers == ("CPUExecutionProvider",)
    remote = create_backend(
        manifest, Settings(inference_backend="kserve-v2", inference_url="http://127.0.0.1:9/")
    )
    assert isinstance(remote, KServeV2Backend)
    assert remote.providers == ("kserve-v2 http://127.0.0.1:9",)
    remote.close()
    with pytest.raises(ValueError, match="inference_url"):
        create_backend(manifest, Settings(inference_backend="kserve-v2", inference_url=None))


# --- KServe v2 ------------------------------------------------------------------------------------


@pytest.fixture
def kserve_backend(manifest: ModelManifest, kserve_url: str) -> Iterator[KServeV2Backend]:
    backend = KServeV2Backend(manifest, kserve_url)
    yield backend
    backend.close()


def test_kserve_matches_onnxruntime(
    kserve_backend: KServeV2Backend, ort_backend: OnnxRuntimeBackend, brain_batch: np.ndarray
) -> None:
    remote = kserve_backend.infer(brain_batch[:2])
    local = ort_backend.infer(brain_batch[:2])
    assert remote.shape == local.shape == (2, 4)
    assert remote.dtype == np.float32
    np.testing.assert_allclose(remote, local, atol=1e-5)


def test_kserve_warm_up_checks_readiness_and_infers(manifest: ModelManifest, kserve_url: str) -> None:
    # batch_size 1 keeps the zero batch cheap on a 2-core machine.
    backend = KServeV2Backend(_manifest_with(manifest, batch_size=1), kserve_url)
    backend.warm_up()
    assert backend.providers == (f"kserve-v2 {kserve_url}",)
    backend.close()


def test_kserve_unknown_model_is_an_inference_error(
    manifest: ModelManifest, kserve_url: str, brain_batch: np.ndarray
) -> None:
    backend = KServeV2Backend(manifest, kserve_url, model_name="no-such-model")
    with pytest.raises(InferenceError, match="HTTP 404") as info:
        backend.infer(brain_batch[:1])
    assert not isinstance(info.value, InferenceUnavailable)
    with pytest.raises(InferenceError, match="HTTP 404"):
        backend.warm_up()
    backend.close()


def test_kserve_server_error_is_unavailable(manifest: ModelManifest, kserve_url: str) -> None:
    # A manifest that promises a smaller image: the server's ONNX Runtime fails, KServe answers 500.
    small = _manifest_with(manifest, input={"height": 8, "width": 8})
    backend = KServeV2Backend(small, kserve_url)
    with pytest.raises(InferenceUnavailable, match="HTTP 500"):
        backend.infer(np.zeros((1, 8, 8, 3), dtype=np.float32))
    backend.close()


def test_kserve_stopped_server_is_unavailable(manifest: ModelManifest, brain_batch: np.ndarray) -> None:
    # Nothing listens on a fresh free port: what a client sees from a stopped server.
    backend = KServeV2Backend(manifest, f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(InferenceUnavailable, match="unreachable"):
        backend.infer(brain_batch[:1])
    with pytest.raises(InferenceUnavailable):
        backend.warm_up()
    backend.close()


def test_kserve_unknown_output_is_an_inference_error(manifest: ModelManifest, kserve_url: str) -> None:
    other = _manifest_with(manifest, output={"name": "not_an_output"})
    backend = KServeV2Backend(other, kserve_url)
    with pytest.raises(InferenceError, match="HTTP 400") as info:
        backend.infer(np.zeros((1, 240, 240, 3), dtype=np.float32))
    assert not isinstance(info.value, InferenceUnavailable)
    backend.close()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"outputs": [{"name": "other", "shape": [1, 4], "data": [0, 0, 1, 0]}]}',
        b'{"outputs": [{"name": "dense_3", "shape": [1, 5], "data": [0, 0, 1, 0]}]}',
        b'{"outputs": [{"name": "dense_3", "shape": [2, 4], "data": [0, 0, 1, 0, 0, 0, 1, 0]}]}',
        b'{"model_name": "x"}',
    ],
    ids=["not-json", "no-such-output", "bad-shape", "wrong-batch", "no-outputs"],
)
def test_kserve_malformed_answer_is_an_inference_error(manifest: ModelManifest, body: bytes) -> None:
    # A mock transport: no real server sends these, and that is the point of checking them.
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    backend = KServeV2Backend(manifest, "http://kserve.invalid", client=httpx.Client(transport=transport))
    with pytest.raises(InferenceError) as info:
        backend.infer(np.zeros((1, 240, 240, 3), dtype=np.float32))
    assert not isinstance(info.value, InferenceUnavailable)
