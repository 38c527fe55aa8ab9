"""The PACS side of `$import` (fhir_facade/intake/import_pacs.py) against a real Orthanc that asks
for credentials: posting over kept-alive connections, refusals, and a connection the server closed."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from fhir_facade.intake import import_pacs
from fhir_facade.intake.import_pacs import OrthancStore
from tests import dicom_factory
from tests.intake.conftest import valid_ct_study


@pytest.fixture(scope="module")
def locked_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOrthanc]:
    with EmbeddedOrthanc(
        tmp_path_factory.mktemp("orthanc-import-pacs"), http_port=free_port(), dicom_port=free_port()
    ) as instance:
        yield instance


def test_stores_with_credentials_over_one_kept_connection(locked_pacs: EmbeddedOrthanc) -> None:
    files = [dicom_factory.to_bytes(ds) for ds in valid_ct_study("PACS-1", n_instances=3)]
    store = OrthancStore(locked_pacs.url, timeout=30, connections=2, auth=locked_pacs.credentials)
    try:
        answers = [store.store(content) for content in files]
        assert [a.status for a in answers] == ["Success"] * 3, answers
        assert all(store.exists(a.pacs_id) for a in answers)
        assert len(store._poster._all) == 1  # one thread, one connection, kept alive
        again = store.store(files[0])
        assert (again.status, again.pacs_id) == ("AlreadyStored", answers[0].pacs_id)
    finally:
        store.close()


def test_a_connection_closed_by_the_server_or_idle_is_replaced(locked_pacs: EmbeddedOrthanc) -> None:
    first, second, third = (dicom_factory.to_bytes(ds) for ds in valid_ct_study("PACS-2", n_instances=3))
    store = OrthancStore(locked_pacs.url, timeout=30, connections=1, auth=locked_pacs.credentials)
    try:
        assert store.store(first).status == "Success"
        kept = store._poster._local.connection
        kept.sock.shutdown(socket.SHUT_RDWR)  # as if the server had closed it between two posts
        assert store.store(second).status == "Success"  # sent once more on a fresh connection
        assert store._poster._local.connection is not kept
        fresh = store._poster._local.connection
        time.sleep(import_pacs._IDLE_SECONDS + 0.1)
        assert store.store(third).status == "Success"
        assert store._poster._local.connection is not fresh  # idle too long: not trusted
        assert len(store._poster._all) == 1
    finally:
        store.close()


def test_refusals_and_an_unreachable_pacs_are_answers(locked_pacs: EmbeddedOrthanc) -> None:
    content = dicom_factory.to_bytes(valid_ct_study("PACS-3", n_instances=1)[0])
    wrong = OrthancStore(locked_pacs.url, timeout=30, connections=1, auth=("facade", "not-the-password"))
    try:
        answer = wrong.store(content)
        assert answer.status == "Failed" and answer.reason.startswith("the PACS refused it (401)"), answer
    finally:
        wrong.close()
    right = OrthancStore(locked_pacs.url, timeout=30, connections=1, auth=locked_pacs.credentials)
    try:
        answer = right.store(b"not DICOM at all")
        assert answer.status == "Failed" and answer.reason.startswith("the PACS refused it (400)"), answer
    finally:
        right.close()
    gone = OrthancStore(f"http://127.0.0.1:{free_port()}", timeout=5, connections=1)
    try:
        answer = gone.store(content)
        assert answer == import_pacs.StoreAnswer(
            "Failed", reason="the PACS could not be reached: ConnectionRefusedError"
        )
    finally:
        gone.close()
