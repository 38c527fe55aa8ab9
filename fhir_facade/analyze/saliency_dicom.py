"""The saliency map as DICOM (a Parametric Map over the key image) and as a PNG for FHIR (ADR 0035).

A Parametric Map (PS3.3 A.75, built with highdicom) has one float32 frame in the key image's
matrix, referencing the key image as its source (Referenced Image / Source Image sequences,
the image's Frame of Reference and plane position), so a viewer that shows parametric maps
(3D Slicer, OHIF 3.9+) lays it over that image. Its Real World Value Mapping says what the
numbers are: the drop of the reported class's log-odds when the region is hidden (unit 1, no
dimension). It is written to the study's AI result area: its own series, numbered after the SR
of the same result (`sr_series_number`), and the SR references it. Pure: no I/O.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import RE_VALID_UID

from fhir_facade import __version__
from fhir_facade.analyze.result import CodedConcept
from fhir_facade.analyze.saliency import OcclusionGrid

__all__ = [
    "BRAIN",
    "OCCLUSION_SENSITIVITY",
    "PARAMETRIC_MAP_STORAGE",
    "build_saliency_map",
    "render_overlay_png",
    "require_valid_uids",
]

#: Parametric Map Storage SOP Class (PS3.4 B.5).
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"

_TYPE2_READ = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip

#: SNOMED CT 12738006 "Brain": the region the default model's key images show.
BRAIN = CodedConcept("http://snomed.info/sct", "12738006", "Brain")

#: How the map was derived (Derivation Code Sequence): no DICOM code names occlusion sensitivity.
OCCLUSION_SENSITIVITY = hd.sr.CodedConcept(
    value="occlusion", scheme_designator="99FHIRFACADE", meaning="Occlusion sensitivity"
)

_UNITLESS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")


def require_valid_uids(**uids: str) -> None:
    """Refuse a UID that DICOM would not store (PS3.5 9.1: at most 64 digits and dots): highdicom
    would write it, and the PACS refuse the object only later, at the store."""
    for argument, value in uids.items():
        if len(value) > 64 or not RE_VALID_UID.match(value):
            raise ValueError(f"{argument} is not a valid DICOM UID: {value!r}")


def build_saliency_map(
    source: Dataset,
    grid: OcclusionGrid,
    concept: CodedConcept,
    *,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int,
    model_id: str,
    patch: int,
    stride: int,
    anatomy: CodedConcept = BRAIN,
) -> hd.pm.ParametricMap:
    """The occlusion map of `source` (the full key image dataset) for the class `concept`;
    `anatomy`: the region the map covers (Frame Anatomy)."""
    require_valid_uids(series_uid=series_uid, sop_instance_uid=sop_instance_uid)
    source = with_type2(source)
    rows, columns = int(source.Rows), int(source.Columns)
    values = grid.at(rows, columns)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0  # a flat map: any non-empty range
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="LOGODDS_DROP",
        lut_explanation=f"Log-odds drop of {concept.display} when hidden"[:64],
        unit=_UNITLESS,
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
    )
    top = max(high, 0.0)
    pm = hd.pm.ParametricMap(
        source_images=[source],
        pixel_array=values[np.newaxis],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer="fhir-facade",
        manufacturer_model_name="fhir-facade",
        software_versions=__version__,
        device_serial_number=model_id[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        # Shows the evidence (positive values) from nothing to the strongest region.
        voi_lut_transformations=[
            hd.content.VOILUTTransformation(
                window_center=top / 2 if top > 0 else 0.5, window_width=top if top > 0 else 1.0
            )
        ],
        content_label="SALIENCY",
        content_description=(
            f"Occlusion sensitivity of {model_id} for {concept.display}: patch {patch}, stride {stride} "
            "(model input pixels)"
        )[:64],
        content_creator_name="fhir-facade^AI",
        series_description="AI saliency map (preliminary, unverified)",
        derivation=OCCLUSION_SENSITIVITY,
    )
    # Frame Anatomy (PS3.3 C.7.6.16.2.8): the region and "U" (unpaired), so General Series
    # Laterality (Type 2C, for paired parts) is not expected; highdicom does not write it.
    frame_anatomy = Dataset()
    frame_anatomy.AnatomicRegionSequence = [
        hd.sr.CodedConcept(anatomy.code, anatomy.dicom_scheme, anatomy.display)
    ]
    frame_anatomy.FrameLaterality = "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [frame_anatomy]
    return pm


def with_type2(source: Dataset) -> Dataset:
    """A shallow copy of `source` with the Type 2 Patient/Study attributes highdicom reads added
    empty where the image lacks them (PS3.3 allows them empty, not absent; tests' images may)."""
    copy = Dataset(source)
    for keyword in _TYPE2_READ:
        if keyword not in copy:
            setattr(copy, keyword, None)
    return copy


def render_overlay_png(source: Dataset, image: np.ndarray, grid: OcclusionGrid) -> bytes:
    """The key image with the map's positive part over it (red to yellow, opacity rising with
    the value), at the image's matrix, as PNG. `image` is one channel of the model input (the
    image as the model saw it, windowed), brought back to the image's matrix here."""
    rows, columns = int(source.Rows), int(source.Columns)
    gray = np.asarray(
        Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
            (columns, rows), Image.Resampling.BILINEAR
        )
    ).astype(np.float64)
    span = gray.max() - gray.min()
    gray = (gray - gray.min()) / span if span > 0 else np.zeros_like(gray)
    values = grid.at(rows, columns).astype(np.float64)
    top = values.max()
    level = np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values)
    alpha = 0.6 * level
    colour = np.stack([np.ones_like(level), level, np.zeros_like(level)], axis=-1)
    rgb = gray[..., None] * (1 - alpha[..., None]) + colour * alpha[..., None]
    buffer = io.BytesIO()
    pixels = (rgb * 255).round().astype(np.uint8)
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
