"""Occlusion sensitivity: where in the key image the model found its evidence (ADR 0035).

The model is a slice classifier (no boxes, no gradients from ONNX Runtime's inference session),
so the map is measured with the model itself, as Zeiler & Fergus did ("Visualizing and
Understanding Convolutional Networks", ECCV 2014): a square patch of the model input is set to
the background value (the low end of the manifest's `scale`, what air looks like after
windowing), every position of a grid in turn, and the drop of the reported class's log-odds is
that patch's value. All occluded copies go through the same backend as the analysis, in batches
of the manifest's `batch_size`; nothing else is loaded.

Why log-odds and not the probability: the softmax saturates (0.99997 on the demo's skull-base
slice), so most patches move the probability by less than 0.001 while the log-odds move by
several units. A positive value is a region whose removal weakens the finding (evidence for
it); a negative one is a region that argues against it.

The value of a patch belongs to its centre; the map is the bilinear interpolation between
patch centres (constant beyond the outermost centres), evaluated directly at the source image's
pixels (the model input is the whole image resized, `pixels.to_model_input`). Inside the
outermost centres its maximum is the centre of the most important patch; between them and the
image edge the map is flat (those pixels were hidden by the edge patches only), so where the
strongest patch is an edge one the maximum is a short plateau from its centre to the edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fhir_facade.analyze.manifest import InputSpec
from fhir_facade.analyze.result import AnalysisResult, ScoredInstance

__all__ = ["OcclusionGrid", "SaliencyOptions", "key_instance", "log_odds", "occlusion_sensitivity"]

#: Probabilities are clipped to [EPS, 1 - EPS] before taking log-odds (float32 resolution).
_EPS = 1e-7


@dataclass(frozen=True)
class SaliencyOptions:
    """The occlusion settings (FACADE_ANALYZE_SALIENCY_PATCH / _STRIDE), in model input pixels."""

    patch: int
    stride: int


@dataclass(frozen=True)
class OcclusionGrid:
    """The patch values of one occlusion run, with where each patch's centre lies in the input."""

    values: np.ndarray
    """(rows, columns) float32: the class's log-odds drop per patch position."""
    centres_y: np.ndarray
    centres_x: np.ndarray
    input_height: int
    input_width: int
    baseline: float
    """The class's probability on the unoccluded image."""
    passes: int
    """Occluded copies run through the model."""

    def at(self, rows: int, columns: int) -> np.ndarray:
        """The map at `rows` x `columns` pixels covering the same field as the model input
        (the source image's matrix): bilinear between patch centres, float32."""
        # Pixel centres of the target in input coordinates (PIL's resize convention).
        ys = (np.arange(rows) + 0.5) * (self.input_height / rows) - 0.5
        xs = (np.arange(columns) + 0.5) * (self.input_width / columns) - 0.5
        along_x = np.stack([np.interp(xs, self.centres_x, row) for row in self.values])  # (r, columns)
        full = np.stack([np.interp(ys, self.centres_y, along_x[:, j]) for j in range(columns)], axis=1)
        return full.astype(np.float32)


def log_odds(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p clipped away from 0 and 1."""
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def _starts(size: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one axis, the last one flush with the far edge."""
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occlusion_sensitivity(
    infer: Callable[[np.ndarray], np.ndarray],
    tensor: np.ndarray,
    spec: InputSpec,
    class_index: int,
    *,
    patch: int,
    stride: int,
    batch_size: int,
) -> OcclusionGrid:
    """The occlusion grid of one model input (`pixels.to_model_input`) for output `class_index`.

    `infer` is the analysis backend's `infer` (one probability row per input). Costs
    ceil(positions / batch_size) + 1 model calls, positions = per axis ceil((size - patch) /
    stride) + 1.
    """
    if patch < 1 or stride < 1 or batch_size < 1:
        raise ValueError(f"patch, stride and batch_size must be >= 1 (got {patch}, {stride}, {batch_size})")
    spatial = (0, 1) if spec.layout == "NHWC" else (1, 2)
    height, width = tensor.shape[spatial[0]], tensor.shape[spatial[1]]
    rows, columns = _starts(height, patch, stride), _starts(width, patch, stride)
    positions = [(r, c) for r in rows for c in columns]
    fill = np.float32(spec.scale[0])
    baseline = float(infer(tensor[None])[0, class_index])
    drops = np.empty(len(positions), dtype=np.float64)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        copies = np.repeat(tensor[None], len(chunk), axis=0)
        for i, (r, c) in enumerate(chunk):
            if spec.layout == "NHWC":
                copies[i, r : r + patch, c : c + patch, :] = fill
            else:
                copies[i, :, r : r + patch, c : c + patch] = fill
        probabilities = infer(copies)[:, class_index]
        drops[start : start + len(chunk)] = log_odds(np.asarray(baseline)) - log_odds(probabilities)
    half = min(patch, height) / 2 - 0.5, min(patch, width) / 2 - 0.5
    return OcclusionGrid(
        values=drops.reshape(len(rows), len(columns)).astype(np.float32),
        centres_y=np.asarray(rows, dtype=np.float64) + half[0],
        centres_x=np.asarray(columns, dtype=np.float64) + half[1],
        input_height=height,
        input_width=width,
        baseline=baseline,
        passes=len(positions),
    )


def key_instance(result: AnalysisResult, negative_label: str | None) -> ScoredInstance | None:
    """The key image of a positive result: the assessed slice with the highest probability of
    the reported class (the first of the decision's top-k). None for a negative or undetermined
    result: there is no finding to show evidence for."""
    decision = result.decision
    if not decision.assessed or decision.label == negative_label or not decision.supporting:
        return None
    return decision.supporting[0]
