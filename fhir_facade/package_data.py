"""Where the FHIR artifact folders (capability/, mappings/, operations/) live, installed or not."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["data_path"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_path(folder: str) -> Path:
    """The folder shipped as package data in a wheel, else the source checkout's top-level one."""
    installed = Path(str(files("fhir_facade"))) / "_data" / folder
    return installed if installed.is_dir() else _REPO_ROOT / folder
