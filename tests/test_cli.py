"""The command line: no unauthenticated listening beyond loopback by accident; the demo's start-up
analysis announced; backend clients registered; passwords reset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from joserfc.jwk import ECKey

from fhir_facade.auth.server.passwords import verify_secret
from fhir_facade.auth.server.registry import create_demo_registry, load_registry
from fhir_facade.cli import check_listen_address, demo_analysis_notice, main
from fhir_facade.config import Settings


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_is_always_allowed(host: str) -> None:
    check_listen_address(Settings(), host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "facade.hospital.example"])
def test_other_addresses_are_refused_without_the_explicit_setting(host: str) -> None:
    with pytest.raises(SystemExit, match="FACADE_ALLOW_UNAUTHENTICATED_REMOTE"):
        check_listen_address(Settings(), host)
    check_listen_address(Settings(allow_unauthenticated_remote=True), host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_any_address_with_smart_security(host: str) -> None:
    check_listen_address(Settings(auth="smart"), host)


def test_register_backend_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ECKey.generate_key("P-384", parameters={"kid": "nightly-1"}, private=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    monkeypatch.setenv("FACADE_AUTH_CLIENTS_FILE", str(tmp_path / "clients.json"))
    args = [
        "register-backend-client",
        "--client-id",
        "nightly-export",
        "--jwks",
        str(jwks),
        "--scope",
        "system/ImagingStudy.rs",
    ]
    assert main(args) == 0
    client = load_registry(tmp_path / "clients.json").client("nightly-export")
    assert (
        client is not None and client.kind == "backend-service" and client.scope == "system/ImagingStudy.rs"
    )
    assert main(args) == 2  # the same client_id twice
    assert "nightly-export" in capsys.readouterr().err
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [key.as_dict(private=True)]}))
    assert main([*args[:2], "other", "--jwks", str(private)]) == 2  # private key material is refused


def test_the_start_up_analysis_of_the_demo_study_is_announced() -> None:
    notice = demo_analysis_notice(Settings(), "1.2.3", stable_age=5)
    assert notice.startswith("demo: analysing study 1.2.3 with brain-tumor-vgg16 at start-up")
    assert "FACADE_DEMO_ANALYZE=false" in notice


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"demo_analyze": False}, "FACADE_DEMO_ANALYZE=false"),
        ({"watch_studies": False}, "FACADE_WATCH_STUDIES=false"),
        ({"analyze_enabled": False}, "FACADE_ANALYZE_ENABLED=false"),
        ({"task_modalities": frozenset({"CT"})}, "FACADE_TASK_MODALITIES has no MR"),
    ],
)
def test_and_so_is_why_it_is_not_analysed(setting: dict[str, object], reason: str) -> None:
    notice = demo_analysis_notice(Settings(**setting), "1.2.3", stable_age=5)  # type: ignore[arg-type]
    assert notice.startswith(f"demo: study 1.2.3 is not analysed at start-up ({reason})")
    assert "/ImagingStudy/1.2.3/$analyze" in notice


def test_set_password_resets_the_demo_users_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry_file = tmp_path / "clients.json"
    create_demo_registry(registry_file)
    monkeypatch.setenv("FACADE_AUTH_CLIENTS_FILE", str(registry_file))

    assert main(["set-password"]) == 0  # a generated one, printed once
    printed = capsys.readouterr().out
    assert "restart the server" in printed.lower()
    generated = printed.split("New password of 'demo': ")[1].split(" ")[0]
    demo = load_registry(registry_file).user("demo")
    assert demo is not None and verify_secret(generated, demo.password_hash)
    assert demo.patients == ("DEMO-0001",)  # the rest of the user is kept

    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert main(["set-password", "--username", "demo", "--password-stdin"]) == 0
    assert "correct horse" not in capsys.readouterr().out
    demo = load_registry(registry_file).user("demo")
    assert demo is not None and verify_secret("correct horse battery", demo.password_hash)
    assert not verify_secret(generated, demo.password_hash)
    assert oct(registry_file.stat().st_mode & 0o777) == "0o600"

    assert main(["set-password", "--username", "nobody"]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err


def test_a_demo_study_stored_at_an_earlier_start_is_not_announced_as_analysed() -> None:
    notice = demo_analysis_notice(Settings(), "1.2.3", stable_age=5, stored_before=True)
    assert notice.startswith("demo: study 1.2.3 was stored at an earlier start")
    assert "not analysed now" in notice and "/Task?code=analyze&focus=ImagingStudy/1.2.3" in notice
