"""FACADE_PACS_MODALITIES entries: what is accepted, and a bad one stops the start with its name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fhir_facade.config import Settings
from fhir_facade.embedded import DicomPeer, parse_dicom_peer


@pytest.mark.parametrize(
    ("entry", "peer"),
    [
        ("CT01@10.0.0.5:11112", DicomPeer("CT01", "10.0.0.5", 11112)),
        ("MR 3T@192.168.1.20", DicomPeer("MR 3T", "192.168.1.20", 104)),
        ("US-1@[fd00::7]:4242", DicomPeer("US-1", "fd00::7", 4242)),
    ],
)
def test_entries(entry: str, peer: DicomPeer) -> None:
    assert parse_dicom_peer(entry) == peer


@pytest.mark.parametrize(
    "entry",
    [
        "CT01",  # no address
        "CT01@ct01.hospital.example",  # a host name: Orthanc compares addresses literally
        "@10.0.0.5",  # no AE title
        "A-TITLE-LONGER-THAN-16@10.0.0.5",
        "BACK\\SLASH@10.0.0.5",
        "CT01@10.0.0.5:0",
        "CT01@10.0.0.5:70000",
    ],
)
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_dicom_peer(entry)


def test_settings_refuse_a_bad_entry_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="pacs_modalities"):
        Settings(pacs_modalities=("CT01@ct01.hospital.example",))


def test_a_modality_may_do_what_a_modality_does_and_nothing_else() -> None:
    entry = DicomPeer("CT01", "10.0.0.5").orthanc_modality()
    allowed = {key for key, value in entry.items() if key.startswith("Allow") and value}
    assert allowed == {"AllowEcho", "AllowFindWorklist", "AllowStore"}


def test_pacs_auth_from_settings() -> None:
    assert Settings().pacs_auth is None
    settings = Settings(pacs_username="facade", pacs_password="s3cret")
    assert settings.pacs_auth == ("facade", "s3cret")
    assert "s3cret" not in repr(settings)
