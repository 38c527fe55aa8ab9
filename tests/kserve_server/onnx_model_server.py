"""A real KServe v2 (Open Inference Protocol) server for one ONNX file, for the tests.

Run by the interpreter of `.venv-kserve` (kserve pins its own FastAPI/pydantic, so it does not live
in the facade's virtualenv):

    .venv-kserve/bin/python tests/kserve_server/onnx_model_server.py MODEL.onnx \
        --model-name brain-tumor-vgg16 --port 8085

It serves `POST /v2/models/{name}/infer` and `GET /v2/models/{name}/ready` on 127.0.0.1 only,
REST only (no gRPC), one worker, ONNX Runtime on the CPU: the same stack a KServe
InferenceService runs, minus Kubernetes.

kserve parses sys.argv when imported (kserve.model_server's module-level parser, which ignores
what it does not know); our options use hyphens so they never match its underscore options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import kserve
import kserve.model_server
import numpy as np
import onnxruntime as ort
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer


class OnnxModel(kserve.Model):
    """An ONNX file behind the v2 protocol: inputs by name, the requested outputs (or all)."""

    def __init__(self, name: str, path: Path, threads: int) -> None:
        super().__init__(name)
        self.path = path
        self.threads = threads
        self.session: ort.InferenceSession | None = None

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        assert self.session is not None
        feeds = {item.name: item.as_numpy() for item in payload.inputs}
        names = [node.name for node in self.session.get_outputs()]
        if payload.request_outputs:
            names = [requested.name for requested in payload.request_outputs]
        # ORT rejects unknown input/output names with an exception that KServe turns into a 500;
        # a client error deserves a 400, as Triton answers.
        known_inputs = {node.name for node in self.session.get_inputs()}
        unknown = sorted(set(feeds) - known_inputs) + sorted(
            set(names) - {node.name for node in self.session.get_outputs()}
        )
        if unknown:
            raise InvalidInput(f"unknown tensor names: {unknown}")
        results = self.session.run(names, feeds)
        outputs = []
        for name, value in zip(names, results, strict=True):
            array = np.asarray(value)
            output = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            # binary_data=False: answer with JSON numbers, the part of the protocol every client speaks.
            output.set_data_from_numpy(array.astype(np.float32), binary_data=False)
            outputs.append(output)
        return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs)


def _loopback_rest_server(host: str) -> type[RESTServer]:
    """KServe hard-codes 0.0.0.0; a test server has no business listening beyond this machine."""

    class LoopbackRESTServer(RESTServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = host  # the uvicorn.Server holds this same Config object

    return LoopbackRESTServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("model_file", type=Path, help="the ONNX file to serve")
    parser.add_argument("--model-name", required=True, help="the {name} in /v2/models/{name}")
    parser.add_argument("--port", type=int, required=True, help="HTTP port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    if not args.model_file.is_file():
        parser.error(f"{args.model_file} does not exist")

    kserve.model_server.RESTServer = _loopback_rest_server(args.host)
    model = OnnxModel(args.model_name, args.model_file, args.threads)
    model.load()
    server = kserve.ModelServer(http_port=args.port, workers=1, enable_grpc=False)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
