"""The model on PyTorch: the shipped ONNX file converted by onnx2torch, on a CUDA GPU or the CPU.

Why (ADR 0037): a GPU host often has PyTorch built for its CUDA but not the onnxruntime-gpu wheel
built for that CUDA (onnxruntime-gpu 1.2x is built for CUDA 12; a CUDA 13 host with PyTorch 2.11
has none that loads). The ONNX file stays the one source of truth: it is sha256-checked as for
ONNX Runtime and converted in memory at start-up, so no second model file exists to drift.

Same interface as `OnnxRuntimeBackend`: an (N, *input shape) float32 batch in, (N, labels)
probabilities out, `infer` callable from several worker threads at once (a module in eval mode
under `torch.inference_mode` keeps no state between calls).

Optional: `pip install "fhir-facade[torch]"` (torch, onnx2torch). Nothing here is imported unless
`FACADE_INFERENCE_BACKEND=torch`.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Literal

import numpy as np

from fhir_facade.analyze.inference import (
    InferenceError,
    ModelContractError,
    _check_batch,
    _input_shape,
    _probabilities,
)
from fhir_facade.analyze.manifest import ModelManifest

__all__ = ["Precision", "TorchBackend", "TorchDevice"]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "tf32", "bf16"]
TorchDevice = Literal["auto", "cuda", "cpu"]


def _import(name: str) -> Any:
    """`name`, or an `InferenceError` that says how to install the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise InferenceError(
            f"the torch inference backend needs {name!r}: pip install 'fhir-facade[torch]' ({exc})"
        ) from exc


def _onnx_dims(value_info: Any) -> list[int | None]:
    """The dimensions of an ONNX graph input/output: ints, None where symbolic or unknown."""
    dims = value_info.type.tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in dims]


def check_onnx_contract(manifest: ModelManifest, graph: Any) -> None:
    """The ONNX graph's input and output names and static dimensions against the manifest (the
    same rule as `OnnxRuntimeBackend`, read from the file since there is no session)."""
    inputs = {node.name: node for node in graph.input}
    outputs = {node.name: node for node in graph.output}
    if manifest.input.name not in inputs:
        raise ModelContractError(
            f"model {manifest.id} has no input {manifest.input.name!r} (inputs: {sorted(inputs)})"
        )
    if manifest.output.name not in outputs:
        raise ModelContractError(
            f"model {manifest.id} has no output {manifest.output.name!r} (outputs: {sorted(outputs)})"
        )
    checks = (
        (inputs[manifest.input.name], (None, *_input_shape(manifest))),
        (outputs[manifest.output.name], (None, len(manifest.output.labels))),
    )
    for node, expected in checks:
        shape = _onnx_dims(node)
        mismatch = len(shape) != len(expected) or any(
            have and want is not None and have != want for have, want in zip(shape, expected, strict=False)
        )
        if mismatch:
            raise ModelContractError(
                f"tensor {node.name!r} of model {manifest.id} has shape {shape}, "
                f"the manifest implies {['N' if d is None else d for d in expected]}"
            )
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ModelContractError(f"model {manifest.id}: the torch backend runs one-input, one-output models")


class TorchBackend:
    """The model in this process, on PyTorch (CUDA when there is one, see `device`).

    `device`: `auto` takes `cuda:<device_id>` when PyTorch sees a GPU, else the CPU with a warning;
    `cuda` fails at start-up without one (a GPU deployment should not quietly run on the CPU);
    `cpu` never uses one. `precision` matters on a GPU only: `fp32` exact, `tf32` TensorFloat-32
    matrix products and convolutions, `bf16` autocast (outputs cast back to float32). The TF32
    switches are process-wide PyTorch flags: one precision per process.
    """

    def __init__(
        self,
        manifest: ModelManifest,
        *,
        device: TorchDevice = "auto",
        device_id: int = 0,
        precision: Precision = "tf32",
    ) -> None:
        if precision not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"precision must be fp32, tf32 or bf16, not {precision!r}")
        if device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {device_id}")
        torch = self._torch = _import("torch")
        onnx = _import("onnx")
        onnx2torch = _import("onnx2torch")
        self.manifest = manifest
        path = manifest.model_path  # ModelSourceError when missing or not the manifest's sha256
        proto = onnx.load(str(path))
        check_onnx_contract(manifest, proto.graph)
        try:
            module = onnx2torch.convert(proto).eval()
        except Exception as exc:  # onnx2torch raises NotImplementedError and friends per operator
            raise InferenceError(f"onnx2torch could not convert model {manifest.id}: {exc}") from exc
        self._device = self._choose_device(device, device_id)
        self.precision: Precision = precision
        if self._device.type == "cuda":
            tf32 = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = False  # batch sizes vary; no per-shape autotuning stalls
        self._module: Any = module.to(self._device)
        label = (
            f"torch {torch.__version__} {self._device} {precision if self._device.type == 'cuda' else 'fp32'}"
        )
        self._providers = (label,)
        logger.info("model %s: PyTorch backend on %s", manifest.id, label)

    def _choose_device(self, device: TorchDevice, device_id: int) -> Any:
        torch = self._torch
        if device == "cpu":
            return torch.device("cpu")
        if torch.cuda.is_available():
            if device_id >= torch.cuda.device_count():
                raise InferenceError(
                    f"FACADE_INFERENCE_DEVICE_ID={device_id}, but PyTorch sees "
                    f"{torch.cuda.device_count()} CUDA device(s)"
                )
            return torch.device("cuda", device_id)
        if device == "cuda":
            raise InferenceError(
                f"the torch backend was asked for CUDA, but PyTorch {torch.__version__} sees no GPU "
                f"(built for CUDA {torch.version.cuda})"
            )
        logger.warning(
            "model %s: PyTorch sees no CUDA GPU; the torch backend runs on the CPU", self.manifest.id
        )
        return torch.device("cpu")

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    @property
    def device(self) -> str:
        """Where the model runs, as PyTorch names it (`cuda:0`, `cpu`)."""
        return str(self._device)

    def warm_up(self) -> None:
        """One zero batch of `manifest.batch_size` (CUDA context, cuDNN kernel choice)."""
        zeros = np.zeros((self.manifest.batch_size, *_input_shape(self.manifest)), dtype=np.float32)
        self.infer(zeros)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        module = self._module  # a local reference: close() may run in another thread
        if module is None:
            raise InferenceError(f"the backend of model {self.manifest.id} is closed")
        batch = _check_batch(self.manifest, batch)
        torch = self._torch
        try:
            with torch.inference_mode():
                tensor = torch.from_numpy(batch).to(self._device, non_blocking=True)
                bf16 = self.precision == "bf16" and self._device.type == "cuda"
                with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=bf16):
                    output = module(tensor)
                result = output.float().cpu().numpy()
        except Exception as exc:
            raise InferenceError(f"PyTorch failed on model {self.manifest.id}: {exc}") from exc
        return _probabilities(self.manifest, result, batch.shape[0])

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
