"""Inference backends for `$analyze`: in-process ONNX Runtime, or a remote KServe v2 server.

Both take a batch already shaped like the manifest's input tensor and give back one probability
row per slice, in `manifest.output.labels` order. They are synchronous on purpose: the caller runs
`infer` in a worker thread, so the event loop never waits on a CPU- or network-bound call. A
backend is created once (at start-up, `create_backend`), warmed up, shared by every analysis and
closed on shutdown; handlers never create one.

Failures are typed so the operation can answer correctly: `InferenceUnavailable` (try again later:
a 503), `ModelContractError` (the model does not match its manifest: a deployment error) and
`InferenceError` for everything else the backend refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import httpx
import numpy as np
import onnxruntime as ort

from fhir_facade.analyze.manifest import ModelManifest
from fhir_facade.analyze.ort_providers import provider_specs
from fhir_facade.config import Settings
from fhir_facade.correlation import outgoing_headers

__all__ = [
    "DEFAULT_PROVIDERS",
    "InferenceBackend",
    "InferenceError",
    "InferenceUnavailable",
    "KServeV2Backend",
    "ModelContractError",
    "OnnxRuntimeBackend",
    "choose_providers",
    "create_backend",
]

logger = logging.getLogger(__name__)

DEFAULT_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
"""ONNX Runtime providers tried in this order when none are configured."""


class InferenceError(Exception):
    """The backend refused or failed an inference (bad request, malformed answer, closed)."""


class InferenceUnavailable(InferenceError):
    """The inference service cannot be reached or is failing; the same request may work later."""


class ModelContractError(InferenceError):
    """The model's tensors do not match its manifest (names, shapes, number of labels)."""


@runtime_checkable
class InferenceBackend(Protocol):
    """What `$analyze` needs from a model runner."""

    manifest: ModelManifest

    @property
    def providers(self) -> tuple[str, ...]:
        """What actually runs the model, for logs and the algorithm Device resource."""
        ...

    def warm_up(self) -> None:
        """Run once before serving: the first call pays for allocation and kernel selection."""
        ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities, shape (N, len(labels)) float32, for a batch shaped like the input spec."""
        ...

    def close(self) -> None:
        """Release the session or connection pool; later calls raise `InferenceError`."""
        ...


def _input_shape(manifest: ModelManifest) -> tuple[int, int, int]:
    """The per-slice input shape the manifest promises (without the batch dimension)."""
    spec = manifest.input
    if spec.layout == "NHWC":
        return (spec.height, spec.width, spec.channels)
    return (spec.channels, spec.height, spec.width)


def _check_batch(manifest: ModelManifest, batch: np.ndarray) -> np.ndarray:
    """`batch` as a C-contiguous float32 array of shape (N, *input shape), N >= 1."""
    if not isinstance(batch, np.ndarray):
        raise TypeError(f"batch must be a numpy array, not {type(batch).__name__}")
    expected = _input_shape(manifest)
    if batch.ndim != 4 or batch.shape[0] < 1 or tuple(batch.shape[1:]) != expected:
        raise ValueError(f"batch has shape {batch.shape}, model {manifest.id} expects (N, *{expected})")
    return np.ascontiguousarray(batch, dtype=np.float32)


def _probabilities(manifest: ModelManifest, output: np.ndarray, n: int) -> np.ndarray:
    """Check the output's shape against the manifest and turn logits into probabilities."""
    expected = (n, len(manifest.output.labels))
    if output.shape != expected:
        raise ModelContractError(
            f"output {manifest.output.name!r} of model {manifest.id} has shape {output.shape}, "
            f"expected {expected}"
        )
    output = output.astype(np.float32, copy=False)
    if manifest.output.kind == "logits":
        shifted = output - output.max(axis=1, keepdims=True)  # no overflow in exp
        exp = np.exp(shifted)
        output = exp / exp.sum(axis=1, keepdims=True)
    return output


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The ONNX Runtime providers to ask for, in order: `requested` (or `DEFAULT_PROVIDERS`) minus
    those this onnxruntime build lacks.

    An unavailable provider is dropped with a warning rather than failing start-up, so one setting
    works on GPU and CPU hosts; if nothing is left the error names what is available, because a
    deployment that asked only for a GPU should not silently run on the CPU.
    """
    available = ort.get_available_providers()
    wanted = list(DEFAULT_PROVIDERS if requested is None else requested)
    chosen = [name for name in wanted if name in available]
    dropped = [name for name in wanted if name not in available]
    if dropped and requested is not None:
        logger.warning(
            "ONNX Runtime providers %s are not available in this build (available: %s); dropped",
            dropped,
            available,
        )
    if not chosen:
        raise InferenceError(
            f"none of the ONNX Runtime providers {wanted} is available (available: {available})"
        )
    return chosen


class OnnxRuntimeBackend:
    """The model in this process, on ONNX Runtime.

    One `InferenceSession` per backend, created here from the sha256-verified file; its `run` is
    thread-safe, so concurrent `infer` calls from several worker threads need no lock.
    """

    def __init__(
        self,
        manifest: ModelManifest,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        device_id: int = 0,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.manifest = manifest
        path = manifest.model_path  # ModelSourceError when missing or not the manifest's sha256
        requested = choose_providers(providers)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=provider_specs(requested, device_id))
        except Exception as exc:  # ORT raises its own pybind exception types
            raise InferenceError(f"ONNX Runtime could not load model {manifest.id}: {exc}") from exc
        # ORT falls back to the CPU when, e.g., the CUDA provider's libraries fail to load: log what
        # actually runs, not what was asked for.
        self._providers = tuple(session.get_providers())
        logger.info(
            "model %s: ONNX Runtime providers requested %s, session uses %s",
            manifest.id,
            requested,
            list(self._providers),
        )
        if self._providers and self._providers[0] != requested[0]:
            logger.warning(
                "model %s: %s was requested first but the session runs on %s",
                manifest.id,
                requested[0],
                self._providers[0],
            )
        self._check_contract(session)
        self._session: ort.InferenceSession | None = session

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    def _check_contract(self, session: ort.InferenceSession) -> None:
        """Names, ranks and static dimensions of the session's tensors against the manifest."""
        manifest = self.manifest
        inputs = {node.name: node for node in session.get_inputs()}
        outputs = {node.name: node for node in session.get_outputs()}
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
            shape = list(node.shape)
            # Symbolic or unknown dimensions (str/None) accept anything; the batch one always is.
            mismatch = len(shape) != len(expected) or any(
                isinstance(have, int) and want is not None and have != want
                for have, want in zip(shape, expected, strict=False)
            )
            if mismatch:
                raise ModelContractError(
                    f"tensor {node.name!r} of model {manifest.id} has shape {shape}, "
                    f"the manifest implies {['N' if d is None else d for d in expected]}"
                )
            if node.type != "tensor(float)":
                raise ModelContractError(f"tensor {node.name!r} is {node.type}, expected tensor(float)")

    def warm_up(self) -> None:
        """One zero batch of `manifest.batch_size`: a cold CUDA first run can take seconds."""
        zeros = np.zeros((self.manifest.batch_size, *_input_shape(self.manifest)), dtype=np.float32)
        self.infer(zeros)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        session = self._session  # a local reference: close() may run in another thread
        if session is None:
            raise InferenceError(f"the backend of model {self.manifest.id} is closed")
        batch = _check_batch(self.manifest, batch)
        try:
            (output,) = session.run([self.manifest.output.name], {self.manifest.input.name: batch})
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed on model {self.manifest.id}: {exc}") from exc
        return _probabilities(self.manifest, np.asarray(output), batch.shape[0])

    def close(self) -> None:
        self._session = None


class KServeV2Backend:
    """A remote model behind the Open Inference Protocol (KServe v2) REST API: Triton, KServe,
    MLServer.

    The tensor travels as JSON numbers (`.ravel().tolist()`): simple and supported by every server,
    but a 240x240x3 float32 slice is ~3.5 MB of JSON and ~0.2 s of encoding on one core, about as
    much as the CPU inference itself. Triton's and KServe's binary tensor extension would cut that
    to the raw 0.7 MB; it is the next step if the network or encoding becomes the bottleneck.
    """

    def __init__(
        self,
        manifest: ModelManifest,
        url: str,
        model_name: str | None = None,
        timeout: float = 60.0,
        client: httpx.Client | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL, got {url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.manifest = manifest
        self.url = url.rstrip("/")
        self.model_name = model_name or manifest.id
        self._owns_client = client is None
        self._client: httpx.Client | None = client or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0))
        )
        self._model_url = f"{self.url}/v2/models/{self.model_name}"

    @property
    def providers(self) -> tuple[str, ...]:
        return (f"kserve-v2 {self.url}",)

    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        """One call to the server, with transport and HTTP errors turned into ours."""
        client = self._client
        if client is None:
            raise InferenceError(f"the backend of model {self.manifest.id} is closed")
        url = f"{self._model_url}{path}"
        try:
            # The id of the request (or worklist job) the analysis runs for, so the model
            # server's log lines can be matched to ours; also on injected clients.
            response = client.request(method, url, json=json, headers=outgoing_headers())
        except httpx.TransportError as exc:
            raise InferenceUnavailable(f"inference server {self.url} unreachable: {exc!r}") from exc
        if response.is_success:
            return response
        # KServe and Triton put the reason in {"error": "..."}.
        try:
            reason = response.json().get("error", response.text)
        except ValueError:
            reason = response.text
        message = f"{method} {url}: HTTP {response.status_code}: {str(reason)[:500]}"
        if response.status_code >= 500:
            raise InferenceUnavailable(message)
        raise InferenceError(message)

    def warm_up(self) -> None:
        """Readiness (`GET /v2/models/{name}/ready`), then one real batch: a ready model can
        still refuse our tensor names or shapes, and that should fail at start-up."""
        self._request("GET", "/ready")
        zeros = np.zeros((self.manifest.batch_size, *_input_shape(self.manifest)), dtype=np.float32)
        self.infer(zeros)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = _check_batch(self.manifest, batch)
        spec = self.manifest.output
        payload = {
            "inputs": [
                {
                    "name": self.manifest.input.name,
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.ravel().tolist(),
                }
            ],
            # binary_data false: Triton's binary extension must not be used for the answer.
            "outputs": [{"name": spec.name, "parameters": {"binary_data": False}}],
        }
        response = self._request("POST", "/infer", json=payload)
        output = self._parse_output(response)
        return _probabilities(self.manifest, output, batch.shape[0])

    def _parse_output(self, response: httpx.Response) -> np.ndarray:
        """The named output tensor of an infer answer (`data` flat in row-major order, or nested)."""
        name = self.manifest.output.name
        try:
            body = response.json()
            outputs = body["outputs"]
            tensor = next(item for item in outputs if item.get("name") == name)
            shape = [int(dim) for dim in tensor["shape"]]
            data = np.asarray(tensor["data"], dtype=np.float32).reshape(shape)
        except StopIteration:
            raise InferenceError(f"the inference answer has no output {name!r}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InferenceError(f"malformed inference answer from {self.url}: {exc!r}") from exc
        return data

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.close()


def create_backend(manifest: ModelManifest, settings: Settings) -> InferenceBackend:
    """The backend that `settings.inference.backend` names, for one model (not warmed up yet)."""
    if settings.inference.backend == "kserve-v2":
        if not settings.inference.url:
            raise ValueError("inference_backend 'kserve-v2' needs inference_url (FACADE_INFERENCE_URL)")
        return KServeV2Backend(manifest, settings.inference.url)
    if settings.inference.backend == "torch":
        # Imported here: torch and onnx2torch are an optional extra (ADR 0037).
        from fhir_facade.analyze.torch_backend import TorchBackend

        return TorchBackend(
            manifest,
            device=settings.inference.torch_device,
            device_id=settings.inference.device_id,
            precision=settings.inference.torch_precision,
        )
    return OnnxRuntimeBackend(
        manifest,
        providers=settings.inference.providers,
        threads=settings.inference.threads,
        device_id=settings.inference.device_id,
    )
