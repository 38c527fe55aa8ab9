"""ONNX Runtime execution providers with their options: which GPU the CUDA provider uses.

Kept apart from inference.py (which chooses *which* providers, ADR 0006) because this is about
*how* a chosen provider runs (ADR 0037). onnxruntime-gpu provides CUDAExecutionProvider; the CPU
wheel lacks it, and `choose_providers` then drops it with a warning (or fails when nothing is left).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["CUDA_PROVIDER", "provider_specs"]

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"


def provider_specs(chosen: Sequence[str], device_id: int = 0) -> list[str | tuple[str, dict[str, Any]]]:
    """`chosen` as `InferenceSession(providers=...)` takes them: the CUDA provider with its
    `device_id`, the others by name. Logs once which GPU the CUDA provider is asked for."""
    if device_id < 0:
        raise ValueError(f"device_id must be >= 0, got {device_id}")
    specs: list[str | tuple[str, dict[str, Any]]] = []
    for name in chosen:
        if name == CUDA_PROVIDER:
            specs.append((name, {"device_id": device_id}))
            logger.info("ONNX Runtime: %s asked for on GPU %d", name, device_id)
        else:
            specs.append(name)
    return specs
