"""bench/gpu_end_to_end.py, the GPU acceptance run of issue 17, run small on the CPU: it starts a
real Orthanc and the facade, loads the studies, fires them at once and prints figures that parse
and hang together. (The GPU figures themselves come from running it on a GPU machine:
docs/scaling.md.)"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_end_to_end.py"
RESULT = re.compile(r"^RESULT (?P<fields>.+)$", re.M)
HAS_TORCH = all(importlib.util.find_spec(name) for name in ("torch", "onnx2torch", "onnx"))


def _run(tmp_path: Path, *options: str) -> tuple[dict[str, str], dict[str, Any], str]:
    figures = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--studies", "3", "--slices", "4", "--json", str(figures), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = RESULT.findall(result.stdout)
    fields = dict(item.split("=", 1) for item in line.split())
    return fields, json.loads(figures.read_text(encoding="utf-8")), result.stdout


def _check(fields: dict[str, str], data: dict[str, Any]) -> None:
    assert int(fields["studies"]) == data["studies"] == 3
    assert int(fields["slices"]) == data["slices"] == 4
    p50, p95, top = float(fields["p50_s"]), float(fields["p95_s"]), float(fields["max_s"])
    assert 0 < p50 <= p95 <= top <= float(fields["wall_s"]) + 1e-3
    assert math.isclose(p95, data["p95_s"], abs_tol=1e-4)
    # The split comes from the facade's own log lines: one per analysis, inference inside them.
    share = float(fields["inference_share"])
    assert 0 < share < 1, fields
    assert 0 < float(fields["analyzer_p50_s"]) <= p50
    assert float(fields["inference_per_slice_ms"]) > 0
    assert math.isclose(float(fields["studies_per_hour"]), 3 * 3600 / float(fields["wall_s"]), rel_tol=1e-3)
    assert fields["target_met"] == str(p95 < 0.5)


def test_cpu_run_prints_figures_that_parse(tmp_path: Path) -> None:
    fields, data, stdout = _run(tmp_path, "--threads", "1")
    _check(fields, data)
    assert fields["backend"] == "onnxruntime"
    assert "CPUExecutionProvider" in fields["runs_on"]
    assert "latency p50 / p95 / max" in stdout


@pytest.mark.skipif(not HAS_TORCH, reason="torch, onnx2torch and onnx (extra `torch`) are not installed")
def test_torch_backend_run_on_the_cpu(tmp_path: Path) -> None:
    fields, data, _ = _run(tmp_path, "--backend", "torch", "--torch-device", "cpu", "--precision", "fp32")
    _check(fields, data)
    assert fields["backend"] == "torch-fp32"
    assert fields["runs_on"].startswith("torch_") and "_cpu_" in fields["runs_on"]


def test_kserve_without_a_url_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--backend", "kserve-v2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "--inference-url" in result.stderr
