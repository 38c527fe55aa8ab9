"""A facade writing worklist items into the folder of a real, credentialed Orthanc that serves them
to the listed test modality (what the order tests of this package share)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fhir_facade.embedded import EmbeddedOrthanc, free_port
from tests.conftest import LiveServer, serve
from tests.worklist.test_findscu import TEST_MODALITY


@contextmanager
def facade_with_worklist_folder(
    tmp_path_factory: pytest.TempPathFactory, name: str, **settings: Any
) -> Iterator[tuple[LiveServer, EmbeddedOrthanc, Path]]:
    """The facade (with extra `settings`), its Orthanc and the worklist folder they share."""
    worklists = tmp_path_factory.mktemp(f"{name}-worklists")
    orthanc = EmbeddedOrthanc(
        tmp_path_factory.mktemp(f"orthanc-{name}"),
        http_port=free_port(),
        dicom_port=free_port(),
        worklist_dir=worklists,
        modalities=[TEST_MODALITY],
    )
    assert orthanc.credentials is not None
    user, password = orthanc.credentials
    with (
        orthanc,
        serve(
            {
                "dicomweb_url": orthanc.dicomweb_url,
                "worklist_dir": worklists,
                "pacs_username": user,
                "pacs_password": password,
                **settings,
            }
        ) as server,
    ):
        yield server, orthanc, worklists
