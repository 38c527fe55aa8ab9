"""The GPU paths (ADR 0037) as far as a machine without a GPU can check them: the PyTorch backend
(onnx2torch) against ONNX Runtime on real slices and the real model, on the CPU; the settings that
choose it; the CUDA provider's options for ONNX Runtime.

torch and onnx2torch are the optional extra `torch` (GBs with PyTorch's CUDA wheels): not in the
test install, so the tests that need them skip with the reason when they are missing. To run them,
put the extra on PYTHONPATH, e.g. `pip install --target /tmp/torchlib torch onnx2torch onnx` and
`PYTHONPATH=/tmp/torchlib .venv/bin/python -m pytest tests/analyze/test_gpu_backends.py`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from fhir_facade.analyze.inference import (
    InferenceError,
    ModelContractError,
    OnnxRuntimeBackend,
    create_backend,
)
from fhir_facade.analyze.manifest import ModelManifest, load_manifests
from fhir_facade.analyze.ort_providers import CUDA_PROVIDER, provider_specs
from fhir_facade.analyze.pixels import to_model_input
from fhir_facade.config import Settings
from fhir_facade.demo.brain_mri import build_demo_study

MODEL_ID = "brain-tumor-vgg16"
HAS_TORCH = all(importlib.util.find_spec(name) for name in ("torch", "onnx2torch", "onnx"))
needs_torch = pytest.mark.skipif(
    not HAS_TORCH,
    reason="torch, onnx2torch and onnx (extra `torch`) are not installed: PyTorch backend untested here",
)


def _settings(**values: Any) -> Settings:
    return Settings(**values)


@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    return load_manifests()[MODEL_ID]


@pytest.fixture(scope="module")
def slices(manifest: ModelManifest) -> np.ndarray:
    """Eight axial slices of the demo study (Colin27) through the facade's own pixel pipeline,
    spread over the brain so that the classes' probabilities differ between slices."""
    study = build_demo_study(n_slices=24)
    return np.stack([to_model_input(ds, manifest.input) for ds in study[4:20:2]])


@pytest.fixture(scope="module")
def ort_probabilities(manifest: ModelManifest, slices: np.ndarray) -> np.ndarray:
    backend = OnnxRuntimeBackend(manifest, providers=["CPUExecutionProvider"])
    try:
        return backend.infer(slices)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def torch_backend(manifest: ModelManifest) -> Iterator[Any]:
    if not HAS_TORCH:
        pytest.skip("torch, onnx2torch and onnx (extra `torch`) are not installed")
    from fhir_facade.analyze.torch_backend import TorchBackend

    backend = TorchBackend(manifest, device="cpu", precision="fp32")
    backend.warm_up()
    yield backend
    backend.close()


# -- ONNX Runtime's CUDA provider options -------------------------------------------------------


def test_cuda_provider_gets_the_configured_device() -> None:
    specs = provider_specs([CUDA_PROVIDER, "CPUExecutionProvider"], device_id=1)
    assert specs == [(CUDA_PROVIDER, {"device_id": 1}), "CPUExecutionProvider"]
    assert provider_specs(["CPUExecutionProvider"], device_id=3) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="device_id"):
        provider_specs([CUDA_PROVIDER], device_id=-1)


def test_ort_backend_with_a_device_id_runs_on_what_this_build_has(manifest: ModelManifest) -> None:
    """The CPU wheel has no CUDA provider: the default order drops it and the session runs on the CPU
    (the fallback rule of ADR 0006); the device id is accepted and does not matter there."""
    backend = create_backend(manifest, _settings(inference_device_id=2))
    try:
        assert isinstance(backend, OnnxRuntimeBackend)
        assert backend.providers[-1] == "CPUExecutionProvider"
    finally:
        backend.close()


# -- settings ---------------------------------------------------------------------------------


def test_settings_choose_the_torch_backend() -> None:
    settings = _settings(inference_backend="torch", inference_torch_precision="bf16", inference_device_id=1)
    assert settings.inference.backend == "torch"
    assert settings.inference.torch_precision == "bf16"
    assert settings.inference.torch_device == "auto"
    assert settings.inference.device_id == 1
    with pytest.raises(ValidationError):
        _settings(inference_torch_precision="fp16")
    with pytest.raises(ValidationError):
        _settings(inference_device_id=-1)


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed: the missing-extra message cannot be seen")
def test_torch_backend_without_the_extra_says_how_to_install_it(manifest: ModelManifest) -> None:
    with pytest.raises(InferenceError, match=r"fhir-facade\[torch\]"):
        create_backend(manifest, _settings(inference_backend="torch"))


# -- the PyTorch backend ----------------------------------------------------------------------


@needs_torch
def test_torch_fp32_agrees_with_onnx_runtime_on_real_slices(
    torch_backend: Any, ort_probabilities: np.ndarray, slices: np.ndarray
) -> None:
    probabilities = torch_backend.infer(slices)
    assert probabilities.shape == ort_probabilities.shape == (len(slices), 4)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, ort_probabilities, atol=1e-5, rtol=0)
    assert (probabilities.argmax(axis=1) == ort_probabilities.argmax(axis=1)).all()
    # The slices are not all alike: the comparison above is not one of constant rows.
    assert np.ptp(ort_probabilities, axis=0).max() > 1e-3


@needs_torch
def test_torch_batches_of_any_size_match_one_by_one(
    torch_backend: Any, ort_probabilities: np.ndarray, slices: np.ndarray
) -> None:
    """(N, ...) in, (N, classes) out for N = 1 and 3 as well: the batching caller may cut anywhere."""
    rows = [torch_backend.infer(slices[i : i + 1]) for i in range(3)]
    np.testing.assert_allclose(np.concatenate(rows), ort_probabilities[:3], atol=1e-5, rtol=0)
    np.testing.assert_allclose(torch_backend.infer(slices[:3]), ort_probabilities[:3], atol=1e-5, rtol=0)


@needs_torch
def test_torch_backend_from_settings_and_its_label(manifest: ModelManifest, slices: np.ndarray) -> None:
    backend = create_backend(manifest, _settings(inference_backend="torch", inference_torch_device="cpu"))
    try:
        (label,) = backend.providers
        assert label.startswith("torch ") and " cpu " in label and label.endswith(" fp32")
        assert backend.infer(slices[:2]).shape == (2, 4)
    finally:
        backend.close()
    with pytest.raises(InferenceError, match="closed"):
        backend.infer(slices[:1])


@needs_torch
def test_torch_refuses_cuda_without_a_gpu(manifest: ModelManifest) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot be seen")
    from fhir_facade.analyze.torch_backend import TorchBackend

    with pytest.raises(InferenceError, match="sees no GPU"):
        TorchBackend(manifest, device="cuda")
    # auto falls back to the CPU (with a warning) instead
    backend = TorchBackend(manifest, device="auto")
    try:
        assert backend.device == "cpu"
    finally:
        backend.close()


@needs_torch
def test_torch_checks_the_model_against_its_manifest(manifest: ModelManifest) -> None:
    from fhir_facade.analyze.torch_backend import TorchBackend

    data = manifest.model_dump()
    data["output"] = {**data["output"], "name": "logits"}
    with pytest.raises(ModelContractError, match="no output 'logits'"):
        TorchBackend(ModelManifest.model_validate(data), device="cpu")
    data = manifest.model_dump()
    data["input"] = {**data["input"], "height": 224, "width": 224}
    with pytest.raises(ModelContractError, match="shape"):
        TorchBackend(ModelManifest.model_validate(data), device="cpu")


@needs_torch
def test_torch_rejects_a_batch_of_the_wrong_shape(torch_backend: Any) -> None:
    with pytest.raises(ValueError, match="expects"):
        torch_backend.infer(np.zeros((1, 3, 240, 240), dtype=np.float32))
