"""The compose deployment is valid for the docker-compose we ship with and wires the facade up."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_file_validates_offline() -> None:
    # Debian's docker-compose 1.29 validates without a Docker daemon (ARCHITECTURE.md).
    executable = shutil.which("docker-compose")
    assert executable, "docker-compose is not installed (apt-get install docker-compose)"
    result = subprocess.run(
        [executable, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_services_and_facade_wiring() -> None:
    services = _compose()["services"]
    assert {"orthanc", "facade", "hapi", "postgres"} <= set(services)
    env = services["facade"]["environment"]
    assert env["FACADE_DICOMWEB_URL"] == "http://orthanc:8042/dicom-web"
    assert env["FACADE_ORTHANC_URL"] == "http://orthanc:8042"
    assert env["FACADE_DATABASE_URL"].startswith("postgresql://facade:")
    assert env["FACADE_DATABASE_URL"].endswith("@postgres:5432/facade")
    assert env["FACADE_FHIR_UPSTREAM_URL"] == "http://hapi:8080/fhir"
    assert "FACADE_WORKLIST_DIR" in env and "FACADE_BASE_URL" in env
    depends = services["facade"]["depends_on"]
    assert depends["orthanc"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"


def test_worklist_folder_is_shared_with_orthanc() -> None:
    services = _compose()["services"]
    facade_dir = services["facade"]["environment"]["FACADE_WORKLIST_DIR"]
    orthanc_dir = services["orthanc"]["environment"]["ORTHANC__WORKLISTS__DATABASE"]

    def volume_for(service: str, target: str) -> str:
        for mount in services[service]["volumes"]:
            source, path = mount.split(":")[:2]
            if path == target:
                return str(source)
        raise AssertionError(f"{service} mounts nothing at {target}")

    assert volume_for("facade", facade_dir) == volume_for("orthanc", orthanc_dir)


def test_hapi_is_r4_on_postgres() -> None:
    env = _compose()["services"]["hapi"]["environment"]
    assert env["hapi.fhir.fhir_version"] == "R4"
    assert env["SPRING_DATASOURCE_URL"] == "jdbc:postgresql://postgres:5432/hapi"


def test_dockerfile_runs_the_cli_as_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "FROM python:3.11-slim" in dockerfile
    assert "USER facade" in dockerfile
    assert 'ENTRYPOINT ["fhir-facade"]' in dockerfile
    assert '"serve", "--host", "0.0.0.0", "--port", "8080"' in dockerfile


def test_facade_requires_smart_tokens_and_keeps_its_keys() -> None:
    facade = _compose()["services"]["facade"]
    env = facade["environment"]
    assert env["FACADE_AUTH"] == "smart"
    assert "FACADE_ALLOW_UNAUTHENTICATED_REMOTE" not in env
    # The built-in authorization server's signing key and registry survive a container restart.
    assert any(mount.split(":")[1] == env["FACADE_DATA_DIR"] for mount in facade["volumes"])


def test_orthanc_serves_only_the_facade_and_listed_modalities() -> None:
    """ADR 0013: HTTP wants the facade's password, DICOM admits listed AE titles from their own
    addresses only, and neither port is published to every interface."""
    services = _compose()["services"]
    orthanc = services["orthanc"]["environment"]
    facade = services["facade"]["environment"]
    assert orthanc["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    assert orthanc["ORTHANC__REGISTERED_USERS"] == (
        '{"fhir-facade": "${ORTHANC_FACADE_PASSWORD:-change-me-orthanc-http}"}'
    )
    assert facade["FACADE_PACS_USERNAME"] == "fhir-facade"
    assert facade["FACADE_PACS_PASSWORD"] == "${ORTHANC_FACADE_PASSWORD:-change-me-orthanc-http}"
    always_allow = {k: v for k, v in orthanc.items() if k.startswith("ORTHANC__DICOM_ALWAYS_ALLOW_")}
    assert set(always_allow) == {
        f"ORTHANC__DICOM_ALWAYS_ALLOW_{op}"
        for op in ("ECHO", "FIND", "FIND_WORKLIST", "GET", "MOVE", "STORE")
    }
    assert set(always_allow.values()) == {"false"}
    assert orthanc["ORTHANC__DICOM_CHECK_MODALITY_HOST"] == "true"
    assert services["orthanc"]["ports"] == ["${ORTHANC_DICOM_LISTEN:-127.0.0.1}:4242:4242"]


def test_facade_replicas_behind_the_proxy() -> None:
    """Issue 17: two or more replicas on the one database, only the proxy published; the proxy's
    configuration (in the repository) balances over exactly the replica services."""
    services = _compose()["services"]
    replicas = {name: s for name, s in services.items() if s.get("image") == "fhir-facade:latest"}
    assert len(replicas) >= 2, sorted(replicas)
    urls = {s["environment"]["FACADE_DATABASE_URL"] for s in replicas.values()}
    assert len(urls) == 1
    ids = {s["environment"]["FACADE_REPLICA_ID"] for s in replicas.values()}
    assert len(ids) == len(replicas)
    assert all("ports" not in s for s in replicas.values())
    proxy = services["proxy"]
    assert proxy["ports"] == ["8080:8080"]
    source, target = proxy["volumes"][0].split(":")[:2]
    assert target == "/etc/nginx/conf.d/default.conf"
    config = (ROOT / source).read_text(encoding="utf-8")
    upstream = {
        line.split()[1] for line in config.splitlines() if line.strip().startswith("server ") and ":" in line
    }
    assert upstream == {f"{name}:8080" for name in replicas}
