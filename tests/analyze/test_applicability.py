"""The slice applicability step (fhir_facade.analyze.applicability, ADR 0031): its measurements and
its rules, on the real Colin27 slices and the real model where that is what is claimed."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from fhir_facade.analyze.applicability import SliceFacts, exclusions, slice_geometry, tissue_fractions
from fhir_facade.analyze.codes import label_concepts
from fhir_facade.analyze.decision import decide
from fhir_facade.analyze.inference import OnnxRuntimeBackend
from fhir_facade.analyze.manifest import InputSpec, SliceApplicability, load_manifests
from fhir_facade.analyze.pixels import to_model_input
from fhir_facade.analyze.result import ScoredInstance
from fhir_facade.demo.brain_mri import build_axial_study, build_demo_study

MANIFEST = load_manifests()["brain-tumor-vgg16"]
RULES = SliceApplicability(
    tissue_threshold=0.1, min_tissue_fraction=0.05, min_section_ratio=0.75, inferior_excluded_fraction=0.33
)
LABELS = MANIFEST.output.labels  # glioma, meningioma, notumor, pituitary


def _instance(
    number: int, probabilities: tuple[float, ...] = (0, 0, 1, 0), series: str = "1.2.3"
) -> ScoredInstance:
    return ScoredInstance(series, f"{series}.{number}", "1.2.840.10008.5.1.4.1.1.4", number, probabilities)


class TestTissueFraction:
    def test_undoes_scale_mean_and_std_in_either_layout(self) -> None:
        unit = np.zeros((8, 8), dtype=np.float32)
        unit[:, :2] = 0.5  # a quarter of the image is tissue
        spec = InputSpec(
            name="x",
            layout="NCHW",
            height=8,
            width=8,
            channels=3,
            scale=(0, 255),
            mean=(10, 20, 30),
            std=(2, 2, 2),
        )
        nchw = np.stack([(unit * 255 - m) / 2 for m in (10, 20, 30)])[None]
        assert tissue_fractions(nchw, spec, 0.1) == [0.25]
        nhwc_spec = spec.model_copy(update={"layout": "NHWC"})
        assert tissue_fractions(nchw.transpose(0, 2, 3, 1), nhwc_spec, 0.1) == [0.25]

    def test_the_model_input_of_a_demo_slice_is_mostly_head(self) -> None:
        [middle] = build_axial_study([72])
        fraction = tissue_fractions(to_model_input(middle, MANIFEST.input)[None], MANIFEST.input, 0.1)[0]
        assert 0.6 < fraction < 0.8


class TestGeometry:
    def _header(self, orientation: list[float], z: float = 12.5) -> Dataset:
        ds = Dataset()
        ds.ImagePositionPatient = [-90.0, -126.0, z]
        ds.ImageOrientationPatient = orientation
        return ds

    def test_axial_slices_give_their_z(self) -> None:
        assert slice_geometry(self._header([1, 0, 0, 0, 1, 0])) == 12.5
        assert slice_geometry(self._header([1, 0, 0, 0, 0.96, -0.28])) == 12.5  # tilted 16 degrees

    def test_sagittal_coronal_and_missing_geometry_give_none(self) -> None:
        assert slice_geometry(self._header([0, 1, 0, 0, 0, -1])) is None
        assert slice_geometry(self._header([1, 0, 0, 0, 0, -1])) is None
        assert slice_geometry(Dataset()) is None


class TestRules:
    def test_each_rule_and_its_reason(self) -> None:
        instances = [_instance(n) for n in range(1, 8)]
        facts = {
            # z from -70 (inferior) to +110; the head spans -70..+80 (the last slice is empty)
            "1.2.3.1": SliceFacts(0.70, -70.0),  # skull base: 0 % of the extent
            "1.2.3.2": SliceFacts(0.72, -25.0),  # 30 %: still skull base
            "1.2.3.3": SliceFacts(0.72, -15.0),  # 37 %: assessed
            "1.2.3.4": SliceFacts(0.70, 30.0),  # assessed
            "1.2.3.5": SliceFacts(0.50, 60.0),  # 69 % of the largest: partial section
            "1.2.3.6": SliceFacts(0.10, 80.0),  # partial section, still head
            "1.2.3.7": SliceFacts(0.01, 110.0),  # no head
        }
        reasons = {e.instance.instance_number: e.reason.code for e in exclusions(instances, facts, RULES)}
        assert reasons == {
            1: "skull-base-level",
            2: "skull-base-level",
            5: "partial-section",
            6: "partial-section",
            7: "no-head-tissue",
        }

    def test_without_geometry_only_the_area_rules_apply(self) -> None:
        instances = [_instance(n) for n in range(1, 4)]
        facts = {
            "1.2.3.1": SliceFacts(0.7, None),
            "1.2.3.2": SliceFacts(0.7, None),
            "1.2.3.3": SliceFacts(0.3, None),
        }
        assert [e.instance.instance_number for e in exclusions(instances, facts, RULES)] == [3]

    def test_series_are_judged_on_their_own(self) -> None:
        """A small series (e.g. a localizer) is not a partial section of a bigger one."""
        big = [_instance(1, series="1.2.3"), _instance(2, series="1.2.3")]
        small = [_instance(1, series="1.2.4"), _instance(2, series="1.2.4")]
        facts = {
            "1.2.3.1": SliceFacts(0.7, 0.0),
            "1.2.3.2": SliceFacts(0.7, 50.0),
            "1.2.4.1": SliceFacts(0.3, None),
            "1.2.4.2": SliceFacts(0.3, None),
        }
        excluded = exclusions([*big, *small], facts, RULES)
        assert [(e.instance.series_uid, e.instance.instance_number) for e in excluded] == [("1.2.3", 1)]

    def test_a_tumour_slice_in_the_assessed_range_still_decides(self) -> None:
        """The step removes slices by where they are, never by what the model says: a slice in
        the assessed range with a tumour output keeps a positive study (there is no real tumour
        image in this project, so the output is set; ADR 0031 states the limitation)."""
        instances = [_instance(n) for n in range(1, 11)]
        instances[5] = _instance(6, (0.97, 0.01, 0.01, 0.01))  # glioma, mid-brain
        instances[0] = _instance(1, (0.0, 1.0, 0.0, 0.0))  # "meningioma" at the skull base
        facts = {f"1.2.3.{n}": SliceFacts(0.7, float(10 * n)) for n in range(1, 11)}
        excluded = exclusions(instances, facts, RULES)
        assert [e.instance.instance_number for e in excluded] == [1, 2, 3]  # z < 10 + 0.33 * 90
        kept = [i for i in instances if i not in {e.instance for e in excluded}]
        decision = decide(kept, LABELS, "notumor", label_concepts(MANIFEST))
        assert (decision.label, decision.probability) == ("glioma", 0.97)


def test_the_demo_slices_that_read_meningioma_are_the_excluded_ones() -> None:
    """The real model on the 24 demo slices: every slice it calls a tumour is excluded, and the
    assessed ones are the mid-brain slices it calls "no tumour"."""
    datasets = build_demo_study()
    batch = np.stack([to_model_input(ds, MANIFEST.input) for ds in datasets])
    outputs = OnnxRuntimeBackend(MANIFEST).infer(batch)
    rules = MANIFEST.slice_applicability
    assert rules is not None
    fractions = tissue_fractions(batch, MANIFEST.input, rules.tissue_threshold)
    instances = [
        _instance(int(ds.InstanceNumber), tuple(float(p) for p in row))
        for ds, row in zip(datasets, outputs, strict=True)
    ]
    facts = {
        i.sop_instance_uid: SliceFacts(f, slice_geometry(ds))
        for i, f, ds in zip(instances, fractions, datasets, strict=True)
    }
    left_out = {e.instance.instance_number for e in exclusions(instances, facts, rules)}
    called_tumour = {i.instance_number for i in instances if int(np.argmax(i.probabilities)) != 2}
    assert called_tumour, "the model does call some demo slices a tumour (the reason for the step)"
    assert called_tumour <= left_out
    assert len(left_out) < len(instances)


@pytest.mark.parametrize("code", ["not-assessed", "no-head-tissue", "partial-section", "skull-base-level"])
def test_codes_fit_a_dicom_code_value(code: str) -> None:
    from fhir_facade.analyze.codes import applicability_concept

    assert len(applicability_concept(code).code) <= 16  # Code Value (0008,0100) is SH
