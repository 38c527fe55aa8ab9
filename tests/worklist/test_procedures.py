"""The procedure catalogue (ADR 0018): the bundled ConceptMap, precedence of a site's map, start-up
validation with errors that name the file and element, and how an order's modality is chosen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.conceptmap import ConceptMap
from pydantic import ValidationError

from fhir_facade.config import Settings
from fhir_facade.package_data import data_path
from fhir_facade.worklist import (
    DCM_SYSTEM,
    ModalityNotDerived,
    ProcedureCatalogue,
    ProcedureMapError,
    bundled_catalogue,
    is_imaging_order,
    load_concept_maps,
    requested_procedure,
    worklist_item,
)

LOINC = "http://loinc.org"
LOCAL = "http://hospital.example.org/fhir/CodeSystem/procedures"


def site_map(**element: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "code": "24590-2",
        "display": "MRT Schädel",
        "target": [{"code": "MR", "equivalence": "wider"}],
    }
    return {
        "resourceType": "ConceptMap",
        "id": "site",
        "status": "active",
        "group": [{"source": LOINC, "target": DCM_SYSTEM, "element": [{**base, **element}]}],
    }


def order(code: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": "sr-1",
        "status": "active",
        "intent": "order",
        "code": code,
        "subject": {"identifier": {"value": "PID-1"}, "display": "Weber, Lena"},
        "occurrenceDateTime": "2026-12-07T08:15:00+01:00",
        **extra,
    }


def test_bundled_concept_map_is_valid_r4_and_loaded() -> None:
    path = data_path("mappings") / "ConceptMap-procedure-to-modality.json"
    ConceptMap.model_validate(json.loads(path.read_text(encoding="utf-8")))
    entry = bundled_catalogue().lookup(LOINC, "24590-2")
    assert entry is not None and (entry.modality, entry.description) == ("MR", "MR Brain")


def test_site_map_takes_precedence(tmp_path: Path) -> None:
    file = tmp_path / "site.json"
    file.write_text(json.dumps(site_map()), encoding="utf-8")
    catalogue = bundled_catalogue().with_site_maps(file)
    entry = catalogue.lookup(LOINC, "24590-2")
    assert entry is not None and entry.description == "MRT Schädel"
    assert catalogue.lookup(LOINC, "24627-2") is not None  # the rest of the bundled one stays


@pytest.mark.parametrize(
    ("resource", "message"),
    [
        (site_map(target=[{"code": "mr", "equivalence": "wider"}]), r"target\[0\]\.code 'mr' is not a DICOM"),
        (site_map(target=[]), r"element\[0\] \(24590-2\) needs exactly one mapping target"),
        ({**site_map(), "group": [{"source": LOINC, "target": LOINC}]}, r"group\[0\]\.target must be"),
        ({**site_map(), "resourceType": "ValueSet"}, "not a ConceptMap"),
        ({**site_map(), "id": "procedure-to-modality"}, "must be a FHIR id other than"),
    ],
)
def test_bad_site_map_is_refused_at_start_up_naming_file_and_element(
    tmp_path: Path, resource: dict[str, Any], message: str
) -> None:
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(resource), encoding="utf-8")
    with pytest.raises(ProcedureMapError, match=message):
        load_concept_maps(file)
    with pytest.raises(ValidationError, match=r"bad\.json"):
        Settings(worklist_procedure_map=file)


def test_missing_or_empty_site_map_location_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no such file or folder"):
        Settings(worklist_procedure_map=tmp_path / "absent.json")
    with pytest.raises(ValidationError, match="holds no"):
        Settings(worklist_procedure_map=tmp_path)
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValidationError, match="cannot be read as JSON"):
        Settings(worklist_procedure_map=tmp_path)


def test_stations_setting_is_validated() -> None:
    assert Settings(worklist_stations={"MR": "MR-SCANNER-1"}).worklist_stations == {"MR": "MR-SCANNER-1"}
    with pytest.raises(ValidationError, match="not a DICOM AE title"):
        Settings(worklist_stations={"MR": "A" * 17})
    with pytest.raises(ValidationError, match="not a DICOM modality"):
        Settings(worklist_stations={"Magnet": "MR1"})


def test_dcm_coding_wins_over_the_catalogue() -> None:
    code = {"coding": [{"system": LOINC, "code": "24590-2"}, {"system": DCM_SYSTEM, "code": "CT"}]}
    procedure = requested_procedure(order(code, category=[]))
    assert procedure.modality == "CT"


def test_station_follows_the_modality() -> None:
    ds = worklist_item(
        order({"coding": [{"system": LOINC, "code": "24627-2"}]}),
        station_ae_title="DEFAULT",
        stations={"MR": "MR-SCANNER-1"},
    )
    assert ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "DEFAULT"
    ds = worklist_item(order({"coding": [{"system": LOINC, "code": "24590-2"}]}), stations={"MR": "MR1"})
    assert ds.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "MR1"


def test_unknown_code_is_modality_not_derived_before_other_checks() -> None:
    unknown = order({"coding": [{"system": LOCAL, "code": "X"}]}, category=[])
    del unknown["occurrenceDateTime"]
    with pytest.raises(ModalityNotDerived) as caught:
        worklist_item(unknown)
    assert caught.value.expression == "ServiceRequest.code"
    assert not is_imaging_order(unknown)  # no category, no DCM, not catalogued: not an imaging order
    assert is_imaging_order(order({"coding": [{"system": LOINC, "code": "24590-2"}]}))
    local = site_map(code="X")
    local["group"][0]["source"] = LOCAL
    assert is_imaging_order(unknown, ProcedureCatalogue([local]))
