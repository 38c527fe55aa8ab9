"""The reading stage with a signed-in practitioner (fhir_facade/reading/stage.py, ADR 0033): the
token's fhirUser becomes the claim's owner and the report's interpreter, and the owner may hand a
Task over. A real pipeline around the real SQL store's providers; the caller is a real `Access`
as the SMART authenticator builds it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_facade.auth.access import Access
from fhir_facade.auth.scopes import parse_scopes
from fhir_facade.fhir.errors import FhirError
from fhir_facade.fhir.pipeline import EventBus, Pipeline, PipelinedProvider
from fhir_facade.reading.codes import TASK_CODE_SYSTEM
from fhir_facade.reading.stage import ReadingStage
from fhir_facade.resources.stored import StoredResourceProvider, TaskProvider
from fhir_facade.store import ResourceStore, create_store_engine, upgrade
from tests.conftest import validate


class Caller:
    access: Access | None = None


@pytest.fixture
def providers(tmp_path: Path) -> Iterator[dict[str, PipelinedProvider]]:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    store = ResourceStore(engine)
    pipeline = Pipeline([ReadingStage()], EventBus(), lambda: Caller.access)
    tasks, reports = pipeline.wrap([TaskProvider(store), StoredResourceProvider("DiagnosticReport", store)])
    yield {"Task": tasks, "DiagnosticReport": reports}
    engine.dispose()


def _as(user: str | None) -> None:
    Caller.access = Access(scopes=parse_scopes("user/*.*"), subject="u", fhir_user=user)


TASK: dict[str, Any] = {
    "resourceType": "Task",
    "status": "requested",
    "intent": "order",
    "priority": "routine",
    "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "read"}]},
    "focus": {"reference": "ImagingStudy/1.2.3"},
}


async def test_a_claim_takes_the_owner_from_fhir_user_and_the_owner_hands_over(
    providers: dict[str, PipelinedProvider],
) -> None:
    tasks = providers["Task"]
    _as("Practitioner/rad-a")
    task = await tasks.create(dict(TASK))
    claimed = (await tasks.update(task["id"], {**task, "status": "in-progress"}, if_match=None)).resource
    assert claimed["owner"] == {"reference": "Practitioner/rad-a"}
    validate(claimed)
    _as("Practitioner/rad-b")
    with pytest.raises(FhirError) as info:
        await tasks.update(
            task["id"], {**claimed, "owner": {"reference": "Practitioner/rad-b"}}, if_match=None
        )
    assert info.value.status == 409 and info.value.issues[0].detail_code == "reading_task_claimed"
    _as("Practitioner/rad-a")  # the owner hands it over
    handed = await tasks.update(
        task["id"], {**claimed, "owner": {"reference": "Practitioner/rad-b"}}, if_match=None
    )
    assert handed.resource["owner"] == {"reference": "Practitioner/rad-b"}


async def test_the_report_interpreter_comes_from_fhir_user(providers: dict[str, PipelinedProvider]) -> None:
    _as("Practitioner/rad-c")
    report = await providers["DiagnosticReport"].create(
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "MR brain report"},
            "imagingStudy": [{"reference": "ImagingStudy/1.2.3"}],
            "conclusion": "Normal.",
        }
    )
    assert report["resultsInterpreter"] == [{"reference": "Practitioner/rad-c"}]
    assert report["presentedForm"][0]["contentType"] == "application/pdf"
    validate(report)
    _as(None)  # a token without fhirUser (a backend client): a signed report names its signer
    with pytest.raises(FhirError) as info:
        await providers["DiagnosticReport"].create({**report, "resultsInterpreter": []})
    assert info.value.status == 422 and info.value.issues[0].detail_code == "report_interpreter_missing"
