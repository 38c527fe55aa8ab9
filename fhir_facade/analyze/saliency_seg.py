"""The saliency map's most salient region as a DICOM Segmentation over the key image (ADR 0035).

Why a second object next to the Parametric Map: the map carries the numbers, but OHIF 3.13 cannot
load a float Parametric Map from Orthanc's DICOMweb plugin (ADR 0044), while it lays DICOM
Segmentations (PS3.3 A.51) over their source image. So the region where the map is at least half
its maximum (`HALF_MAXIMUM`, the map's "full width at half maximum" area) is written as a BINARY
Segmentation (highdicom) with one segment, one frame in the key image's matrix and plane, same
Frame of Reference, referencing the key image. A map whose maximum is not positive (hiding no
region weakened the finding) has no salient region and gets no Segmentation.

Codes: Segmented Property Category SCT 309825002 "Spatial and Relational Concept" (DICOM CID
7150); no code of CID 7151 names "the region a model relied on", so the type is a local code
(PS3.16 8.2, scheme 99FHIRFACADE, as the SR's saliency-map concept). The algorithm is named as in
the SR (model id and version, family DCM 123110 "Artificial Intelligence", CID 7162). Pure: no I/O.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from fhir_facade import __version__
from fhir_facade.analyze.result import CodedConcept
from fhir_facade.analyze.saliency import OcclusionGrid
from fhir_facade.analyze.saliency_dicom import require_valid_uids, with_type2

__all__ = [
    "HALF_MAXIMUM",
    "SALIENT_REGION",
    "SEGMENTATION_STORAGE",
    "SEGMENT_LABEL",
    "build_saliency_segmentation",
    "salient_region",
]

#: Segmentation Storage SOP Class (PS3.4 B.5).
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

#: The region: map values >= this fraction of the map's (positive) maximum.
HALF_MAXIMUM = 0.5

SEGMENT_LABEL = "AI saliency (occlusion) top region"

#: Segmented Property Type: a local code (no CID 7151 concept fits).
SALIENT_REGION = hd.sr.CodedConcept(
    value="saliency-region", scheme_designator="99FHIRFACADE", meaning="Salient region (occlusion)"
)

#: OHIF draws a segment in its Recommended Display CIELab Value: yellow, as the PNG's peak.
_YELLOW = (255, 220, 0)


def salient_region(values: np.ndarray, fraction: float = HALF_MAXIMUM) -> np.ndarray | None:
    """The boolean mask of `values` >= `fraction` x max, or None when the maximum is not positive."""
    top = float(values.max())
    if not top > 0:
        return None
    return np.asarray(values >= fraction * top)


def build_saliency_segmentation(
    source: Dataset,
    grid: OcclusionGrid,
    concept: CodedConcept,
    *,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int,
    model_id: str,
    model_version: str,
) -> hd.seg.Segmentation | None:
    """The Segmentation of `source`'s (the full key image dataset) salient region for the class
    `concept`, or None when the map has no positive value."""
    require_valid_uids(series_uid=series_uid, sop_instance_uid=sop_instance_uid)
    source = with_type2(source)
    mask = salient_region(grid.at(int(source.Rows), int(source.Columns)))
    if mask is None:
        return None
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
        segmented_property_type=SALIENT_REGION,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model_id[:64],
            family=codes.cid7162.ArtificialIntelligence,
            version=model_version[:64],
            parameters={
                "method": "occlusion sensitivity",
                "region": f"map >= {HALF_MAXIMUM:g} x its maximum",
                "class": concept.display[:48],
            },
        ),
        display_color=hd.color.CIELabColor.from_rgb(*_YELLOW),
    )
    return hd.seg.Segmentation(
        source_images=[source],
        pixel_array=mask[np.newaxis].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer="fhir-facade",
        manufacturer_model_name="fhir-facade",
        software_versions=__version__,
        device_serial_number=model_id[:64],
        content_label="SALIENCY",
        content_description=f"Where {model_id} found {concept.display}"[:64],
        content_creator_name="fhir-facade^AI",
        series_description="AI saliency region (preliminary, unverified)",
        # An empty frame is still the answer "this is the region": keep the one frame.
        omit_empty_frames=False,
    )
