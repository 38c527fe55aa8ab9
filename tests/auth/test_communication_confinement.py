"""A `patient/` token sees only its patient's Communications: the type's confinement comes from
the registry (the R4 Patient compartment's `patient` parameter), with no auth code for it."""

from __future__ import annotations

from typing import Any

import httpx

from tests.auth.issuer import TestIssuer
from tests.conftest import LiveServer, ok_json, outcome

FHIR_JSON = {"Content-Type": "application/fhir+json"}
OWN, OTHER = "P-1001", "JP-0042"


def _message(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Communication",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient}"},
        "payload": [{"contentString": f"for {patient}"}],
    }


def test_a_patient_token_sees_only_its_patients_communications(
    secured: LiveServer, issuer: TestIssuer
) -> None:
    admin = {**FHIR_JSON, **issuer.headers("system/*.cruds")}
    own = {**FHIR_JSON, **issuer.headers("launch/patient patient/Communication.cruds", patient=OWN)}
    with httpx.Client(base_url=secured.base_url, timeout=30) as http:
        mine = ok_json(http.post("Communication", json=_message(OWN), headers=admin), 201)["id"]
        theirs = ok_json(http.post("Communication", json=_message(OTHER), headers=admin), 201)["id"]

        assert ok_json(http.get(f"Communication/{mine}", headers=own))["id"] == mine
        outcome(http.get(f"Communication/{theirs}", headers=own), 404, "not-found")
        found = ok_json(http.get("Communication", params={"_count": "100"}, headers=own))
        ids = {e["resource"]["id"] for e in found.get("entry", [])}
        assert mine in ids and theirs not in ids
        asked = ok_json(http.get("Communication", params={"subject": f"Patient/{OTHER}"}, headers=own))
        assert not asked.get("entry")
        # Writing another patient's message is refused like any other type's.
        refused = http.post("Communication", json=_message(OTHER), headers=own)
        assert refused.status_code in (403, 404, 422), refused.text
        created = ok_json(http.post("Communication", json=_message(OWN), headers=own), 201)
        assert created["subject"]["reference"] == f"Patient/{OWN}"
