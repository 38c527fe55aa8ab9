"""Model manifests: what a model is, where its ONNX file lives and what it expects.

A manifest is data (operations/models/<id>.json, shipped as package data) so that reviewers can
read what the `$analyze` operation runs without reading Python, and so that a hospital can add a
model without code. The ONNX file comes from an installed package resource or a file path and is
verified against the manifest's sha256 before a session is created: a swapped model file is an
error, never a silently different answer.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fhir_facade.fhir.ids import FHIR_ID_PATTERN
from fhir_facade.package_data import data_path

__all__ = [
    "Applicability",
    "InputSpec",
    "ModelManifest",
    "ModelSource",
    "ModelSourceError",
    "OutputSpec",
    "SliceApplicability",
    "load_manifest",
    "load_manifests",
]


class ModelSourceError(Exception):
    """The model file is missing or does not match the manifest's sha256."""


class ModelSource(BaseModel):
    """Where the ONNX file is: a resource inside an installed package, or a path."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    package: str | None = None
    resource: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.file is None) == (self.package is None or self.resource is None):
            raise ValueError("give either `file` or both `package` and `resource`")
        return self

    def path(self) -> Path:
        """The file on disk (package resources of installed wheels are plain files)."""
        if self.file is not None:
            return self.file
        assert self.package is not None and self.resource is not None
        try:
            return Path(str(files(self.package).joinpath(self.resource)))
        except ModuleNotFoundError as exc:
            raise ModelSourceError(f"model package {self.package!r} is not installed") from exc


class Applicability(BaseModel):
    """Which series the model applies to: DICOM Modality and Body Part Examined values.

    An empty string in `body_parts` accepts series without (0018,0015), which many MR scanners
    leave empty.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    modalities: frozenset[str]
    body_parts: frozenset[str] = frozenset()
    min_instances: int = Field(1, ge=1)

    def accepts(self, modality: str | None, body_part: str | None) -> bool:
        if (modality or "").upper() not in self.modalities:
            return False
        if not self.body_parts:
            return True
        return (body_part or "").strip().upper() in self.body_parts


class InputSpec(BaseModel):
    """The model input tensor and how a DICOM frame is turned into it.

    Steps (fhir_facade.analyze.pixels): modality rescale, then `windowing` ("dicom": the first
    WindowCenter/Width of the image, falling back to the 0.5/99.5 percentiles; "minmax": the
    percentiles always) to [0, 1], resize to height x width, repeat to `channels`, map [0, 1]
    linearly onto `scale`, then (x - mean) / std per channel when given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    layout: Literal["NHWC", "NCHW"]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    windowing: Literal["dicom", "minmax"] = "dicom"
    scale: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


class OutputSpec(BaseModel):
    """The output tensor: one probability per label, in `labels` order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["probabilities", "logits"]
    labels: tuple[str, ...]
    negative_label: str | None = Field(
        None, description="The label meaning 'nothing found' (the study-level default)."
    )

    @model_validator(mode="after")
    def _negative_is_a_label(self) -> OutputSpec:
        if self.negative_label is not None and self.negative_label not in self.labels:
            raise ValueError(f"negative_label {self.negative_label!r} is not one of labels")
        return self


class SliceApplicability(BaseModel):
    """Which slices of an accepted series the model can assess (ADR 0031): thresholds of the
    per-slice checks in fhir_facade.analyze.applicability, per model because they describe the
    images the model was trained on. Absent from a manifest: every slice is assessed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tissue_threshold: float = Field(
        0.1, gt=0, lt=1, description="A pixel is tissue when its windowed value ([0, 1]) reaches this."
    )
    min_tissue_fraction: float = Field(
        0.05, ge=0, lt=1, description="Below this fraction of tissue pixels a slice shows no head."
    )
    min_section_ratio: float = Field(
        0.75,
        ge=0,
        le=1,
        description="A slice whose tissue area is below this share of its series' largest is a "
        "partial section (vertex, edge of the head).",
    )
    inferior_excluded_fraction: float = Field(
        1 / 3,
        ge=0,
        lt=1,
        description="Axial slices in this inferior share of the head's extent in the series are at "
        "skull-base level.",
    )


class ModelManifest(BaseModel):
    """One model of the `$analyze` operation (operations/models/<id>.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=rf"^{FHIR_ID_PATTERN}$")
    title: str
    version: str
    publisher: str
    description: str
    source: ModelSource
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    applies_to: Applicability
    input: InputSpec
    output: OutputSpec
    label_concept_map: str = Field(description="ConceptMap.url mapping output labels to codes.")
    batch_size: int = Field(4, ge=1, description="Slices per inference call.")
    timeout_s: float = Field(300, gt=0, description="Inference time limit for one study.")
    slice_applicability: SliceApplicability | None = Field(
        None, description="Per-slice applicability checks before the study decision (ADR 0031)."
    )

    @cached_property
    def model_path(self) -> Path:
        """The verified ONNX file: exists and matches `sha256`."""
        path = self.source.path()
        if not path.is_file():
            raise ModelSourceError(f"model file {path} does not exist")
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != self.sha256:
            raise ModelSourceError(
                f"model file {path} has sha256 {digest.hexdigest()}, the manifest says {self.sha256}"
            )
        return path


def load_manifest(path: Path) -> ModelManifest:
    """Parse and validate one manifest file."""
    return ModelManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))


def load_manifests(folder: Path | None = None) -> dict[str, ModelManifest]:
    """Every manifest in operations/models (or `folder`), by id."""
    folder = folder or data_path("operations") / "models"
    manifests = [load_manifest(path) for path in sorted(folder.glob("*.json"))]
    return {manifest.id: manifest for manifest in manifests}
