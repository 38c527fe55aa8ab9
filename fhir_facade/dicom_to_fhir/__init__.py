"""Pure DICOM JSON (PS3.18 F.2) -> FHIR R4 mapping: no I/O, plain JSON-ready dicts out."""

from fhir_facade.dicom_to_fhir.attributes import (
    DicomJson,
    date,
    first_value,
    integer,
    person_name,
    string,
    strings,
)
from fhir_facade.dicom_to_fhir.context import WADO_ENDPOINT_ID, MappingContext
from fhir_facade.dicom_to_fhir.datetimes import (
    fhir_date,
    fhir_datetime,
    parse_offset,
    started_instant,
    started_range,
)
from fhir_facade.dicom_to_fhir.endpoint import ENDPOINT_IDS, endpoint, endpoints
from fhir_facade.dicom_to_fhir.imaging_study import imaging_study_from_dicom
from fhir_facade.dicom_to_fhir.names import human_names, name_text
from fhir_facade.dicom_to_fhir.patient import (
    ENCODED_ID_PREFIX,
    identifier_system_to_issuer,
    parse_patient_resource_id,
    patient_from_dicom,
    patient_identifier,
    patient_resource_id,
)
from fhir_facade.dicom_to_fhir.terminology import body_site_coding, concept_map, laterality_coding

__all__ = [
    "ENCODED_ID_PREFIX",
    "ENDPOINT_IDS",
    "WADO_ENDPOINT_ID",
    "DicomJson",
    "MappingContext",
    "body_site_coding",
    "concept_map",
    "date",
    "endpoint",
    "endpoints",
    "fhir_date",
    "fhir_datetime",
    "first_value",
    "human_names",
    "identifier_system_to_issuer",
    "imaging_study_from_dicom",
    "integer",
    "laterality_coding",
    "name_text",
    "parse_offset",
    "parse_patient_resource_id",
    "patient_from_dicom",
    "patient_identifier",
    "patient_resource_id",
    "person_name",
    "started_instant",
    "started_range",
    "string",
    "strings",
]
