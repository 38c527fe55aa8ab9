"""The per-area sections of Settings (fhir_facade/config.py `SettingsSection`): each reads the flat
FACADE_* fields deployments set, and every field of an area belongs to its section."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_facade.config import (
    AnalyzeSettings,
    DeidentifySettings,
    ImportSettings,
    InferenceSettings,
    LimitsSettings,
    LockoutSettings,
    ReadingSettings,
    ReconcileSettings,
    RemotePacsSettings,
    ReplicaSettings,
    Settings,
    SettingsSection,
    StudyDeleteSettings,
    SubscriptionSettings,
    SyncSettings,
    UpstreamSettings,
    WebAppSettings,
    WorklistSettings,
)

SECTIONS: list[type[SettingsSection]] = [
    AnalyzeSettings,
    ImportSettings,
    DeidentifySettings,
    InferenceSettings,
    LimitsSettings,
    LockoutSettings,
    ReadingSettings,
    ReconcileSettings,
    RemotePacsSettings,
    ReplicaSettings,
    StudyDeleteSettings,
    SubscriptionSettings,
    SyncSettings,
    UpstreamSettings,
    WebAppSettings,
    WorklistSettings,
]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_each_section_field_reads_a_settings_field(section: type[SettingsSection]) -> None:
    settings = Settings(fhir_upstream_url="http://upstream.example/fhir")
    values = section.of(settings)
    for name in type(values).model_fields:
        flat = section.renamed.get(name, section.prefix + name)
        assert flat in Settings.model_fields, f"{section.__name__}.{name} reads no Settings field {flat}"
        assert getattr(values, name) == getattr(settings, flat)


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_every_field_of_an_area_is_in_its_section(section: type[SettingsSection]) -> None:
    read = {section.renamed.get(name, section.prefix + name) for name in section.model_fields}
    area = {name for name in Settings.model_fields if name.startswith(section.prefix)}
    others = {
        s.prefix for s in SECTIONS if s.prefix != section.prefix and s.prefix.startswith(section.prefix)
    }
    area = {name for name in area if not any(name.startswith(prefix) for prefix in others)}
    assert area <= read, f"not in {section.__name__}: {sorted(area - read)}"


def test_environment_reaches_the_sections(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FACADE_SYNC_BATCH_SIZE", "7")
    monkeypatch.setenv("FACADE_WORKLIST_DIR", str(tmp_path))
    monkeypatch.setenv("FACADE_AUTH_LOCKOUT_WINDOW", "42")
    monkeypatch.setenv("FACADE_FHIR_UPSTREAM_URL", "http://upstream.example/fhir/")
    monkeypatch.setenv("FACADE_UPSTREAM_SMART_CLIENT_ID", "facade")
    settings = Settings()
    assert settings.sync.batch_size == 7
    assert settings.worklist.folder == tmp_path
    assert settings.lockout.window == 42
    assert settings.upstream is not None
    assert (settings.upstream.base_url, settings.upstream.client_id) == (
        "http://upstream.example/fhir",
        "facade",
    )


def test_no_upstream_section_without_an_upstream() -> None:
    assert Settings().upstream is None


def test_sections_are_read_only() -> None:
    with pytest.raises(ValueError):
        Settings().sync.batch_size = 1  # type: ignore[misc]
