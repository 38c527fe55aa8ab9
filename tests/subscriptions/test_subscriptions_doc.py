"""docs/subscriptions.md cannot rot: its receiver script and every `sh` block run, in order, against
a real facade (uvicorn, SQLite) with real curl; the `<!-- doctest: NAME -->` comment before a
block names the step the test checks. The JSON samples of the page must have the shape of the
notifications the receiver really gets (same parameters, same parts, same entries)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.conftest import LiveServer, serve, validate
from tests.subscriptions.receiver import status_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "subscriptions.md"
_BLOCK = re.compile(r"(?:<!-- doctest: (?P<name>[\w-]+) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)
_MARK = re.compile(r"<!-- doctest: (?P<name>[\w-]+) -->\n(?!```)")


def _steps() -> list[tuple[str, str, str]]:
    """(name, language, code) of the page's blocks and bare markers, in page order."""
    text = DOC.read_text(encoding="utf-8")
    found = [(m.start(), m["name"] or "", m["lang"], m["code"]) for m in _BLOCK.finditer(text)]
    found += [(m.start(), m["name"], "", "") for m in _MARK.finditer(text)]
    return [(name, lang, code) for _, name, lang, code in sorted(found)]


class DocReceiver:
    """The page's receiver.py, run as the page says (`python3 receiver.py PORT`), its output kept."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.log = folder / "receiver.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        handle = self.log.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "receiver.py", str(self.port)], cwd=self.folder, stdout=handle, stderr=handle
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{self.port}/"], check=False
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None

    def received(self) -> list[tuple[str, dict[str, Any]]]:
        """(Authorization header, Bundle) of each notification printed so far."""
        lines = [
            line for line in self.log.read_text().splitlines() if line.startswith(("Authorization:", "{"))
        ]
        return [
            (lines[i].removeprefix("Authorization: "), json.loads(lines[i + 1]))
            for i in range(0, len(lines) - 1, 2)
            if lines[i].startswith("Authorization:")
        ]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [b for _, b in self.received() if status_of(b)["type"] == kind]


def _wait(check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.1)
    return result


def _shape(bundle: dict[str, Any]) -> tuple[Any, ...]:
    """What a sample must share with the real notification: type, parameters and parts, entries."""
    parameters = bundle["entry"][0]["resource"]["parameter"]
    return (
        bundle["resourceType"],
        bundle["type"],
        [(p["name"], [q["name"] for q in p.get("part", [])]) for p in parameters],
        [sorted(e) for e in bundle["entry"]],
    )


@pytest.fixture(scope="module")
def facade(
    orthanc: EmbeddedOrthanc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, DocReceiver]]:
    receiver = DocReceiver(tmp_path_factory.mktemp("doc"))
    with serve(
        {
            "dicomweb_url": orthanc.dicomweb_url,
            "subscription_endpoints": [f"http://127.0.0.1:{receiver.port}/"],
            "subscription_retry_seconds": 0.2,
            "subscription_max_failures": 2,
            "subscription_poll_interval": 0.05,
        }
    ) as server:
        yield server, receiver
    receiver.stop()


def test_the_worked_example_runs_as_written(facade: tuple[LiveServer, DocReceiver]) -> None:
    server, receiver = facade
    env = {**os.environ, "FHIR": server.base_url, "HOOK": f"http://127.0.0.1:{receiver.port}"}
    samples: dict[str, dict[str, Any]] = {}
    ran: list[str] = []

    def run(code: str) -> str:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=receiver.folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def status_of_subscription() -> str:
        return str(json.loads(run('curl -s "$FHIR/Subscription/$SUB"'))["status"])

    for name, lang, code in _steps():
        if lang == "python":
            (receiver.folder / "receiver.py").write_text(code, encoding="utf-8")
            receiver.start()
        elif lang == "json":
            samples[name] = json.loads(code)
        elif lang == "sh":
            out = run(code)
            ran.append(name)
            if name == "topics":
                count, task_topic = (json.loads(part) for part in out.replace("}{", "}\n{").splitlines())
                assert count["total"] == 4 and validate(task_topic) and task_topic["id"] == "task-status"
            elif name == "create":
                created = json.loads(out)
                assert created["resourceType"] == "Subscription" and created["status"] == "requested"
                env["SUB"] = created["id"]
                (handshake,) = _wait(lambda: receiver.of_type("handshake"))
                _wait(lambda: status_of_subscription() == "active")
                samples["real-handshake"] = handshake
            elif name == "active":
                assert json.loads(out)["status"] == "active"
            elif name == "task":
                assert json.loads(out)["resourceType"] == "Task"
                (event,) = _wait(lambda: receiver.of_type("event-notification"))
                samples["real-event"] = event
                authorization = [a for a, b in receiver.received() if b == event]
                assert authorization == ["Bearer secret-for-the-receiver"]
            elif name == "status":
                status = json.loads(out)
                validate(status)
                assert status_of({"entry": status["entry"]})["events-since-subscription-start"] == "1"
            elif name == "two-tasks":
                assert out.split() == ["201", "201"]
                _wait(lambda: status_of_subscription() == "error")  # two failed deliveries (the test's limit)
            elif name == "events":
                replay = json.loads(out)
                validate(replay)
                events = status_of(replay)
                assert events["type"] == "query-event"
                assert [e["event-number"] for e in events["events"]] == ["2", "3"]
            elif name == "refused":
                outcome = json.loads(out)
                assert outcome["resourceType"] == "OperationOutcome"
                assert outcome["issue"][0]["details"]["coding"][0]["code"] == "subscription_endpoint_refused"
        elif name == "receiver-down":
            receiver.stop()
        elif name == "receiver-up":
            receiver.start()
            _wait(lambda: len(receiver.of_type("event-notification")) == 3)
            _wait(lambda: status_of_subscription() == "active")
            numbers = [
                status_of(b)["events"][0]["event-number"] for b in receiver.of_type("event-notification")
            ]
            assert numbers == ["1", "2", "3"]

    assert ran == ["topics", "create", "active", "task", "status", "two-tasks", "events", "refused"]
    for sample, real in (("handshake", "real-handshake"), ("event-notification", "real-event")):
        validate(samples[sample])
        assert _shape(samples[sample]) == _shape(samples[real]), json.dumps(samples[real], indent=2)
