"""An analysis result as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report), for PACS write-back.

PACS viewers do not read FHIR: the same finding the DiagnosticReport carries is written into the
study as an SR series, built with highdicom (pure: no I/O; `fhir_facade.dicomweb.stow` stores it).

Content tree (DICOM PS3.16 TID 1500):
- observer context (TID 1002/1004): the algorithm as a *device* observer, since no person read
  the images; the document is therefore PARTIAL / UNVERIFIED / PRELIMINARY (PS3.3 C.17.2);
- procedure reported (DCM 121058): LOINC 24590-2 "Brain MRI" (as listed in PS3.16, pydicom's
  `codes.LN.BrainMRI`), the procedure the model applies to;
- image library (TID 1600): the evaluated images with their geometry descriptors;
- one measurement group (TID 1501): tracking identifier (TID 4108), algorithm identification
  (TID 4019), the qualitative evaluation named DCM 121071 "Finding" (TID 1501's finding row) whose
  value is the decision's concept, and one numeric measurement (TID 300) per class, named by the
  class's concept, in UCUM "{probability}" (an annotated unity: a dimensionless number in [0, 1]);
  then one qualitative evaluation per image the applicability step left out of the decision
  (ADR 0031): name "Image not assessed by the AI model", value the reason (both from
  mappings/CodeSystem-analysis-applicability.json, scheme 99FHIRFACADE), with the image (IMAGE,
  INFERRED FROM, DCM 121112 "Source of Measurement") and the Instance Number and measurement in
  words (TEXT, HAS PROPERTIES) as its children. When every image was left out the finding is
  SNOMED CT "Undetermined" and the group has no scores.

A new result of the same model supersedes the earlier ones: its SR names their SRs in the
Predecessor Documents Sequence (0040,A360; PS3.3 C.17.2, ADR 0031).

The SR copies the Patient and Study modules of the evidence, so the PACS files it as a new
series of the analysed study.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Iterable, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import RE_VALID_UID, UID

from fhir_facade import __version__
from fhir_facade.analyze.codes import applicability_concept
from fhir_facade.analyze.result import (
    AnalysisResult,
    CodedConcept,
    ExcludedInstance,
    PreviousSr,
    ScoredInstance,
)

__all__ = [
    "COMPREHENSIVE_3D_SR",
    "FIRST_AI_SERIES_NUMBER",
    "PROBABILITY_UNIT",
    "PROCEDURE_MR_BRAIN",
    "SALIENCY_MAP_CONCEPT",
    "SALIENCY_REGION_CONCEPT",
    "build_analysis_sr",
    "evidence_header",
    "sr_retrieve_url",
]

log = logging.getLogger(__name__)

#: Comprehensive 3D SR Storage SOP Class (PS3.4 B.5).
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

#: The Series Number of a study's first AI result series (later ones: `sr_series_number`).
FIRST_AI_SERIES_NUMBER = 9901

#: LOINC 24590-2, listed in DICOM PS3.16 (CID 646) as "Brain MRI": the procedure reported.
PROCEDURE_MR_BRAIN = CodedConcept("http://loinc.org", "24590-2", "Brain MRI")

#: The measurement group's reference to the saliency map of the key image (ADR 0035): no DICOM
#: code names "saliency map", so a local one (PS3.16 8.2).
SALIENCY_MAP_CONCEPT = hd.sr.CodedConcept(
    value="saliency-map", scheme_designator="99FHIRFACADE", meaning="Saliency map (occlusion sensitivity)"
)
#: ... and to the Segmentation of the map's most salient region (`saliency_seg`), local as well.
SALIENCY_REGION_CONCEPT = hd.sr.CodedConcept(
    value="saliency-region", scheme_designator="99FHIRFACADE", meaning="Salient region (occlusion)"
)

#: UCUM annotation "{probability}": a dimensionless 1 with a name saying what the number is.
PROBABILITY_UNIT = hd.sr.CodedConcept(value="{probability}", scheme_designator="UCUM", meaning="probability")

# Patient (PS3.3 C.7.1.1), Clinical Trial Subject (C.7.1.3), General Study (C.7.2.1),
# Patient Study (C.7.2.2) and Clinical Trial Study (C.7.2.3) root attributes: what highdicom
# copies from the evidence into the SR (tests check this against highdicom's module table).
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient
    "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar", "PatientSex", "QualityControlSubject", "StrainDescription",
    "StrainNomenclature", "StrainStockSequence", "StrainAdditionalInformation", "StrainCodeSequence",
    "GeneticModificationsSequence", "OtherPatientNames", "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence", "EthnicGroupCodeSequence", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "OtherClinicalTrialProtocolIDsSequence", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID", "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyDescription", "ProcedureCodeSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "ReferencedStudySequence", "StudyInstanceUID",
    "StudyID", "RequestingService", "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus",
    "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered",
    "ReasonForVisit", "ReasonForVisitCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence", "PatientState",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType", "ClinicalTrialTimePointTypeCodeSequence",
    "IssuerOfClinicalTrialTimePointID", "ConsentForClinicalTrialUseSequence",
)  # fmt: skip

# Type 2 attributes highdicom reads as attributes of the first evidence dataset: present, maybe
# empty, in every valid image, but metadata from QIDO or a trimmed header may lack them.
_TYPE2_READ = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip

# What else highdicom reads from an evidence image: SOP and series identity, the image library
# descriptors (TID 1602-1604) and the acquisition equipment it records as contributing equipment.
_IMAGE_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality",
    "InstanceNumber", "TimezoneOffsetFromUTC", "FrameOfReferenceUID", "Rows", "Columns",
    "NumberOfFrames", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
    "SliceThickness", "SpacingBetweenSlices", "PatientOrientation", "ImagerPixelSpacing",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime",
)  # fmt: skip

# Namespace of this facade's name-based UIDs (a fixed random UUID).
_UID_NAMESPACE = uuid.UUID("6f1d3a52-8a57-4f0e-9d4c-2b1e0c7a9e31")

_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def evidence_header(ds: Dataset) -> Dataset:
    """Just what the SR needs from a source instance: identity, Patient/Study modules, geometry.

    Keeps memory small (no pixel data, no private tags) when a study's instances are held while
    the SR is built; works on full datasets and on metadata (e.g. `Dataset.from_json` of WADO-RS
    metadata) alike. Missing Type 2 patient/study attributes are added empty, as PS3.3 allows.
    """
    missing = [keyword for keyword in _REQUIRED if not ds.get(keyword)]
    if missing:
        raise ValueError(f"evidence dataset lacks {', '.join(missing)}")
    header = Dataset()
    for keyword in (*_IMAGE_KEYWORDS, *PATIENT_STUDY_KEYWORDS):
        if keyword in ds:
            # A copy: the header must not share mutable elements with the source dataset.
            header[keyword] = copy.deepcopy(ds[keyword])
    for keyword in _TYPE2_READ:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def sr_retrieve_url(dicomweb_base: str, study: str, series: str, instance: str) -> str:
    """The WADO-RS URL of one instance (PS3.18 10.4.1.1.3), e.g. for FHIR `Observation.derivedFrom`
    or an ImagingStudy endpoint."""
    return f"{dicomweb_base.rstrip('/')}/studies/{study}/series/{series}/instances/{instance}"


def build_analysis_sr(
    result: AnalysisResult,
    evidence: Sequence[Dataset],
    *,
    series_uid: str,
    sop_instance_uid: str,
    series_number: int = FIRST_AI_SERIES_NUMBER,
    instance_number: int = 1,
    procedure: CodedConcept = PROCEDURE_MR_BRAIN,
    manufacturer: str = "fhir-facade",
    algorithm_manufacturer: str | None = None,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    series_description: str = "AI result (preliminary, unverified)",
    predecessors: Sequence[PreviousSr] = (),
    saliency_map: Dataset | None = None,
    saliency_region: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the Comprehensive 3D SR (TID 1500) that reports `result` on its study.

    `evidence` must hold a dataset (or its `evidence_header`) for every evaluated and supporting
    instance, all of study `result.study_uid`. `series_uid`/`sop_instance_uid` are the caller's
    so that a retried write-back stores the same instance instead of a duplicate series;
    `series_number` is the caller's too: the next free one of the study (`sr_series_number`).
    `manufacturer` is the equipment that writes the SR (this facade); the model is named in the
    content (device observer, algorithm identification). `predecessors`: the SRs of the results
    this one supersedes (Predecessor Documents Sequence). `saliency_map`: the result's saliency
    Parametric Map (ADR 0035), referenced from the measurement group and listed in the evidence;
    `saliency_region`: the Segmentation of its most salient region, the same way.
    """
    for argument, value in (("series_uid", series_uid), ("sop_instance_uid", sop_instance_uid)):
        if len(value) > 64 or not RE_VALID_UID.match(value):
            raise ValueError(f"{argument} is not a valid DICOM UID (PS3.5 9.1, at most 64 chars): {value!r}")
    decision = result.decision
    headers = [evidence_header(ds) for ds in evidence]
    if not headers:
        raise ValueError("evidence must hold at least one dataset")
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    other_studies = sorted({str(h.StudyInstanceUID) for h in headers} - {result.study_uid})
    if other_studies:
        raise ValueError(
            f"evidence holds instances of other studies than {result.study_uid}: {other_studies}"
        )
    evaluated = _unique(result.instances)
    # A study none of whose images could be assessed has no supporting images: its library stays
    # empty rather than describing every image (about 50 ms each).
    supporting = _unique(decision.supporting) or (evaluated if decision.assessed else [])
    absent = [
        item.sop_instance_uid for item in (*evaluated, *supporting) if item.sop_instance_uid not in by_uid
    ]
    if absent:
        raise ValueError(f"evidence lacks evaluated/supporting instances: {sorted(set(absent))}")
    unnamed = [label for label in decision.class_scores if label not in decision.class_concepts]
    if unnamed:
        raise ValueError(f"result.decision.class_concepts has no concept for {unnamed}")

    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_id,
        version=result.model_version,
        manufacturer=algorithm_manufacturer,
        parameters=[
            f"decision method: {decision.method}",
            f"model sha256: {result.model_sha256}",
            *(f"{label} score: 1 - the highest tumour class score" for label in decision.derived_scores),
        ],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            # Stable per SR instance: a rewritten SR keeps tracking the same finding.
            uid=_name_uid(f"tracking:{sop_instance_uid}"),
            identifier=f"{result.model_id} study classification",
        ),
        algorithm_id=algorithm,
        # TID 1501 row "Finding" (DCM 121071): the qualitative evaluation that carries the answer.
        # highdicom writes it as `finding_type` (a CODE item, CONTAINS, named 121071) and reads it
        # back as `.finding_type`. A QualitativeEvaluation named 121071 would write the same item
        # but later in the group, and highdicom's get_qualitative_evaluations() skips that name.
        finding_type=_code(decision.concept),
        measurements=[
            hd.sr.Measurement(
                name=_code(decision.class_concepts[label]), value=float(score), unit=PROBABILITY_UNIT
            )
            for label, score in _in_label_order(decision.class_scores, result.labels)
        ]
        or None,
        qualitative_evaluations=[_not_assessed(item, by_uid) for item in result.excluded] or None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(by_uid[item.sop_instance_uid])
            for item in supporting
        ]
        or None,
    )
    named = ((SALIENCY_MAP_CONCEPT, saliency_map), (SALIENCY_REGION_CONCEPT, saliency_region))
    saliency = [(concept, derived) for concept, derived in named if derived is not None]
    for concept, derived in saliency:
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=concept,
                referenced_sop_class_uid=str(derived.SOPClassUID),
                referenced_sop_instance_uid=str(derived.SOPInstanceUID),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # One UID per exact model file: the same model is the same device in every report.
            uid=_name_uid(f"model:{result.model_id}:{result.model_version}:{result.model_sha256}"),
            name=result.model_title,
            manufacturer_name=algorithm_manufacturer,
            model_name=result.model_id,
        ),
    )
    # The image library (TID 1600) lists the images the measurements refer to: the supporting
    # ones. Every evaluated image is still in the evidence (CurrentRequestedProcedureEvidence).
    library = [by_uid[item.sop_instance_uid] for item in supporting]
    describable = [h for h in library if _describable(h)]
    if len(describable) < len(library):
        log.warning(
            "SR %s: %d of %d images lack geometry descriptors and are left out of the image library",
            sop_instance_uid,
            len(library) - len(describable),
            len(library),
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(procedure),
        imaging_measurements=[group],
        referenced_images=describable or None,
    )
    # The library images first: highdicom copies the Patient and Study modules from evidence[0].
    library_uids = {str(h.SOPInstanceUID) for h in library}
    ordered = library + [h for h in headers if str(h.SOPInstanceUID) not in library_uids]
    ordered.extend(evidence_header(derived) for _, derived in saliency)
    return hd.sr.Comprehensive3DSR(
        evidence=ordered,
        content=report,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name="fhir-facade",
        software_versions=__version__,
        series_description=series_description,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        # No person has read the result: not complete, not verified, not final (PS3.3 C.17.2).
        is_complete=False,
        is_verified=False,
        is_final=False,
        previous_versions=[_predecessor(p) for p in predecessors] or None,
    )


def _not_assessed(excluded: ExcludedInstance, by_uid: dict[str, Dataset]) -> hd.sr.QualitativeEvaluation:
    """One image left out of the decision: the reason, the image and its Instance Number."""
    evaluation = hd.sr.QualitativeEvaluation(
        name=_code(applicability_concept("not-assessed")), value=_code(excluded.reason)
    )
    instance = excluded.instance
    image = hd.sr.ImageContentItem(
        name=codes.DCM.SourceOfMeasurement,
        referenced_sop_class_uid=instance.sop_class_uid,
        referenced_sop_instance_uid=instance.sop_instance_uid,
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )
    number = instance.instance_number if instance.instance_number is not None else "unknown"
    detail = hd.sr.TextContentItem(
        name=_code(applicability_concept("instance-number")),
        value=f"{number}: {excluded.detail}"[:1024],  # UT would allow more; keep it a line
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )
    evaluation[0].ContentSequence = DicomSequence([image, detail])
    return evaluation


def _predecessor(previous: PreviousSr) -> Dataset:
    """What highdicom needs of a predecessor SR for its Predecessor Documents Sequence item."""
    ds = Dataset()
    ds.StudyInstanceUID = previous.study_uid
    ds.SeriesInstanceUID = previous.series_uid
    ds.SOPInstanceUID = previous.sop_instance_uid
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    return ds


def _code(concept: CodedConcept) -> hd.sr.CodedConcept:
    """Our terminology-neutral concept as a DICOM code (scheme designator per PS3.16 8)."""
    return hd.sr.CodedConcept(
        value=concept.code, scheme_designator=concept.dicom_scheme, meaning=concept.display
    )


def _name_uid(name: str) -> UID:
    """A UID that is the same for the same `name`: "2.25." + a name-based (SHA-1) UUID as an integer
    (PS3.5 B.2 allows UUID-derived UIDs; ISO/IEC 9834-8 defines the name-based variant)."""
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


def _unique(instances: Iterable[ScoredInstance]) -> list[ScoredInstance]:
    seen: set[str] = set()
    out: list[ScoredInstance] = []
    for item in instances:
        if item.sop_instance_uid not in seen:
            seen.add(item.sop_instance_uid)
            out.append(item)
    return out


def _in_label_order(scores: dict[str, float], labels: Sequence[str]) -> list[tuple[str, float]]:
    """Scores in the model's label order, then any extra labels: a stable SR content order."""
    ordered = [(label, scores[label]) for label in labels if label in scores]
    return ordered + [(label, score) for label, score in scores.items() if label not in labels]


def _describable(header: Dataset) -> bool:
    """Whether highdicom can write an image library entry (TID 1602-1604) for this image.

    The entry needs the image's geometry (PixelSpacing, ImagePositionPatient, SliceThickness...);
    Type 2 attributes left empty by a scanner would otherwise fail the whole SR.
    """
    if header.get("Modality") in _CROSS_SECTIONAL:
        # What highdicom reads for CT/MR/PT entries, checked without building one (that costs
        # as much as the entry itself).
        return all(header.get(keyword) not in (None, "") for keyword in _CROSS_SECTIONAL_GEOMETRY)
    try:
        hd.sr.ImageLibraryEntryDescriptors(header)
    except (AttributeError, KeyError, TypeError, ValueError):
        return False
    return True


_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_CROSS_SECTIONAL_GEOMETRY = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
)
