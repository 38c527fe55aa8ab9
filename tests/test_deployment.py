"""The compose deployment is valid for the docker-compose we ship with and wires the facade up."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
import yaml

from fhir_facade.analyze.manifest import load_manifests
from fhir_facade.analyze.triton_repository import write_model_repository

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
MODEL_ID = "brain-tumor-vgg16"


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
    # The browser code /app and /viewer serve is built into the image from the pinned tarballs
    # (ADR 0043), never fetched at run time, and the runtime is pointed at it.
    assert "RUN python3 scripts/install_web_vendor.py run" in dockerfile
    assert "COPY --from=web-vendor /src/.web-vendor /opt/fhir-facade/web-vendor" in dockerfile
    assert "FACADE_WEB_APP_VENDOR_DIR=/opt/fhir-facade/web-vendor" in dockerfile


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
    # The GPU profile's one-shot model copier runs the same image with its own entrypoint: no replica.
    replicas = {
        name: s
        for name, s in services.items()
        if s.get("image") == "fhir-facade:latest" and "entrypoint" not in s
    }
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


# -- GPU profile: NVIDIA Triton behind the replicas' KServe v2 backend (ADR 0037) ---------------

TRITON_REPOSITORY = ROOT / "deploy" / "triton" / "model_repository"
GPU_ENV = ROOT / "deploy" / "gpu.env"
_ONNX_TYPES = {"tensor(float)": "TYPE_FP32"}


def _resolved_compose(*options: str) -> dict[str, Any]:
    """`docker-compose [options] config` as data: what docker-compose itself makes of the file."""
    executable = shutil.which("docker-compose")
    assert executable, "docker-compose is not installed (apt-get install docker-compose)"
    result = subprocess.run(
        [executable, "-f", str(COMPOSE_FILE), *options, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def _pbtxt_tensors(text: str, section: str) -> list[dict[str, Any]]:
    """The tensors of an `input [...]`/`output [...]` section of a Triton config.pbtxt (the subset
    this repository writes: name, data_type, dims)."""
    body = re.search(rf"^{section}\s*\[(.*?)^\]", text, re.S | re.M)
    assert body, f"no {section} section"
    tensors = []
    for block in re.findall(r"\{(.*?)\}", body.group(1), re.S):
        name = re.search(r'name:\s*"([^"]+)"', block)
        data_type = re.search(r"data_type:\s*(\w+)", block)
        dims = re.search(r"dims:\s*\[([^\]]*)\]", block)
        assert name and data_type and dims, block
        tensors.append(
            {
                "name": name.group(1),
                "data_type": data_type.group(1),
                "dims": [int(d) for d in dims.group(1).split(",") if d.strip()],
            }
        )
    return tensors


def test_compose_validates_with_the_gpu_profile() -> None:
    data = _resolved_compose("--env-file", str(GPU_ENV), "--profile", "gpu")
    services = data["services"]
    for name in ("facade", "facade-2"):
        env = services[name]["environment"]
        assert env["FACADE_INFERENCE_BACKEND"] == "kserve-v2"
        assert env["FACADE_INFERENCE_URL"] == "http://triton:8000"
    # Without the env file the replicas keep running the model themselves.
    plain = _resolved_compose("--profile", "gpu")["services"]["facade"]["environment"]
    assert plain["FACADE_INFERENCE_BACKEND"] == "onnxruntime"


def test_triton_is_in_the_gpu_profile_only_and_gets_a_gpu() -> None:
    services = _compose()["services"]
    triton, init = services["triton"], services["triton-model-repository"]
    assert triton["profiles"] == ["gpu"] and init["profiles"] == ["gpu"]
    assert all("profiles" not in s for n, s in services.items() if not n.startswith("triton"))
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "--model-repository=/models" in triton["command"]
    assert "ports" not in triton  # internal network only
    assert triton["depends_on"]["triton-model-repository"]["condition"] == "service_completed_successfully"
    # The one-shot service writes the volume Triton reads, from the configurations in the repository.
    assert "triton-models:/models" in init["volumes"]
    assert "triton-models:/models:ro" in triton["volumes"]
    assert f"./{TRITON_REPOSITORY.relative_to(ROOT)}:/configs:ro" in init["volumes"]
    assert init["entrypoint"][:3] == ["python", "-m", "fhir_facade.analyze.triton_repository"]


def test_triton_model_config_matches_the_shipped_model() -> None:
    """Names, types and per-slice dimensions of config.pbtxt against the ONNX model itself (read by
    ONNX Runtime) and its manifest; the model's name is the manifest id the facade asks for."""
    manifest = load_manifests()[MODEL_ID]
    text = (TRITON_REPOSITORY / MODEL_ID / "config.pbtxt").read_text(encoding="utf-8")
    assert re.search(rf'^name:\s*"{MODEL_ID}"$', text, re.M)
    assert re.search(r'^platform:\s*"onnxruntime_onnx"$', text, re.M)
    max_batch = re.search(r"^max_batch_size:\s*(\d+)$", text, re.M)
    assert max_batch and int(max_batch.group(1)) >= manifest.batch_size
    assert "KIND_GPU" in text
    session = ort.InferenceSession(str(manifest.model_path), providers=["CPUExecutionProvider"])
    for section, nodes in (("input", session.get_inputs()), ("output", session.get_outputs())):
        expected = [
            {"name": node.name, "data_type": _ONNX_TYPES[node.type], "dims": list(node.shape[1:])}
            for node in nodes
        ]
        assert _pbtxt_tensors(text, section) == expected
    (model_input,) = _pbtxt_tensors(text, "input")
    assert model_input["name"] == manifest.input.name
    assert model_input["dims"] == [manifest.input.height, manifest.input.width, manifest.input.channels]
    (model_output,) = _pbtxt_tensors(text, "output")
    assert model_output["name"] == manifest.output.name
    assert model_output["dims"] == [len(manifest.output.labels)]


def test_model_repository_is_written_from_the_installed_model(tmp_path: Path) -> None:
    written = write_model_repository(TRITON_REPOSITORY, tmp_path / "models")
    assert written == [MODEL_ID]
    folder = tmp_path / "models" / MODEL_ID
    model = folder / "1" / "model.onnx"
    assert hashlib.sha256(model.read_bytes()).hexdigest() == load_manifests()[MODEL_ID].sha256
    assert (folder / "config.pbtxt").read_bytes() == (
        TRITON_REPOSITORY / MODEL_ID / "config.pbtxt"
    ).read_bytes()
    assert not list(folder.rglob("*.partial"))
    # A configuration for a model the facade has no manifest of is refused.
    stray = tmp_path / "configs" / "no-such-model"
    stray.mkdir(parents=True)
    (stray / "config.pbtxt").write_text('name: "no-such-model"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no model manifest"):
        write_model_repository(tmp_path / "configs", tmp_path / "other")
