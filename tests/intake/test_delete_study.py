"""`DELETE ImagingStudy/{id}` against a real Orthanc: off unless configured (405), its own scope
(`ImagingStudy.d`, else 403), the study really deleted in the PACS, audited, published on the bus
(ResourceChanged delete) and put in the sync outbox for the upstream (ADR 0040)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.fhir.pipeline import ChangeKind, ResourceChanged
from tests import dicom_factory
from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome, serve
from tests.dicom_factory import SeriesSpec, StudySpec

KEPT = StudySpec(patient_id="DEL-1", patient_name="KEPT^K", series=[SeriesSpec("MR", "T1", 1, n_instances=1)])
GONE = StudySpec(patient_id="DEL-1", patient_name="KEPT^K", series=[SeriesSpec("MR", "T2", 1, n_instances=2)])


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("pacs"), http_port=free_port(), dicom_port=free_port(), http_auth=False
    ) as orthanc:
        with httpx.Client(timeout=30) as client:
            for spec in (KEPT, GONE):
                dicom_factory.upload(client, orthanc.url, dicom_factory.build_study(spec))
        yield orthanc


@pytest.fixture(scope="module")
def secured(pacs: EmbeddedOrthanc) -> Iterator[tuple[LiveServer, TestIssuer, list[ResourceChanged]]]:
    port = free_port()
    issuer = TestIssuer(audience=f"http://127.0.0.1:{port}/fhir")
    settings = {
        **issuer.facade_settings,
        "dicomweb_url": pacs.dicomweb_url,
        "orthanc_url": pacs.url,
        "study_delete_enabled": True,
        "fhir_upstream_url": f"http://127.0.0.1:{free_port()}/fhir",  # nobody there: the queue waits
    }
    try:
        with serve(settings, port=port) as server:
            heard: list[ResourceChanged] = []

            async def listen(event: ResourceChanged) -> None:
                heard.append(event)

            server.app.state.store.bus.subscribe(ResourceChanged, listen)
            yield server, issuer, heard
    finally:
        issuer.close()


def _studies_in(pacs: EmbeddedOrthanc) -> set[str]:
    with httpx.Client(timeout=30) as client:
        found = client.post(f"{pacs.url}/tools/find", json={"Level": "Study", "Query": {}, "Expand": True})
        return {s["MainDicomTags"]["StudyInstanceUID"] for s in found.json()}


def test_off_unless_configured(pacs: EmbeddedOrthanc) -> None:
    server = serve({"dicomweb_url": pacs.dicomweb_url, "orthanc_url": pacs.url})
    with server, httpx.Client(base_url=server.base_url, timeout=30) as http:
        outcome(http.delete(f"/ImagingStudy/{KEPT.study_uid}"), 405, "not-supported")
        study = next(
            r for r in ok_json(http.get("/metadata"))["rest"][0]["resource"] if r["type"] == "ImagingStudy"
        )
        assert "delete" not in {i["code"] for i in study["interaction"]}
    assert KEPT.study_uid in _studies_in(pacs)


def test_delete_needs_its_scope_and_deletes_in_the_pacs(
    secured: tuple[LiveServer, TestIssuer, list[ResourceChanged]], pacs: EmbeddedOrthanc
) -> None:
    server, issuer, heard = secured
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        refused = http.delete(
            f"/ImagingStudy/{GONE.study_uid}", headers=issuer.headers("system/ImagingStudy.rs")
        )
        outcome(refused, 403, "forbidden")
        assert "ImagingStudy.d" in refused.headers["www-authenticate"]
        assert GONE.study_uid in _studies_in(pacs)

        deleted = http.delete(
            f"/ImagingStudy/{GONE.study_uid}", headers=issuer.headers("system/ImagingStudy.rd")
        )
        assert deleted.status_code == 204, deleted.text
        assert _studies_in(pacs) == {KEPT.study_uid}  # that study and only that one
        outcome(
            http.get(f"/ImagingStudy/{GONE.study_uid}", headers=issuer.headers("system/ImagingStudy.rs")),
            404,
            "not-found",
        )
        # published on the bus, once, as a delete of that study
        assert [(e.change, e.resource_type, e.resource_id) for e in heard] == [
            (ChangeKind.DELETED, "ImagingStudy", GONE.study_uid)
        ]
        # reflected upstream: a deletion row waits in the outbox
        status = ok_json(http.get("$sync-status", headers=issuer.headers("system/*.rs")))
        assert _part(status, "pending") >= 1
        # audited: an AuditEvent of the delete naming the study
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            bundle = ok_json(
                http.get(
                    "/AuditEvent",
                    params={"subtype": "delete", "entity": f"ImagingStudy/{GONE.study_uid}"},
                    headers=issuer.headers("system/AuditEvent.rs"),
                )
            )
            events = [e["resource"] for e in bundle.get("entry", [])]
            if not events:
                time.sleep(0.3)
        assert events and events[0]["action"] == "D"
        assert events[0]["type"]["code"] == "110105"  # DICOM Study Deleted (PS3.15 A.5.3.5)


def test_unknown_study_is_404(secured: tuple[LiveServer, TestIssuer, list[ResourceChanged]]) -> None:
    server, issuer, _ = secured
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        outcome(
            http.delete("/ImagingStudy/1.2.3.4.999", headers=issuer.headers("system/ImagingStudy.rd")),
            404,
            "not-found",
        )


def _part(parameters: dict[str, Any], name: str) -> int:
    for parameter in parameters.get("parameter", []):
        if parameter["name"] == name:
            return int(next(v for k, v in parameter.items() if k.startswith("value")))
    raise AssertionError(f"no {name} in {parameters}")
