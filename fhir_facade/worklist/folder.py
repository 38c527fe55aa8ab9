"""The folder of `.wl` files that Orthanc's ModalityWorklists plugin answers worklist C-FINDs from.

The plugin reads every `*.wl` file of its `Worklists.Database` folder on each query (PS3.4 K.4.1.2
C-FIND SCP behaviour is the plugin's job), so this folder is the whole worklist: writing a file
schedules a step, removing it withdraws the step. Writes are atomic (a temporary file in the same
folder, then `os.replace`), so a query running during a write sees the old item or the new one, never
a partial file; temporary names do not end in `.wl`, so the plugin ignores them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset

from fhir_facade.fhir.ids import is_fhir_id
from fhir_facade.worklist.mwl_item import DEFAULT_STATION_AE_TITLE, WorklistMappingError, worklist_item
from fhir_facade.worklist.procedures import ProcedureCatalogue

__all__ = ["SyncResult", "WorklistFolder", "is_schedulable", "sync_service_request"]

SyncResult = Literal["written", "removed", "skipped"]

_SUFFIX = ".wl"
# R4 id type (datatypes.html#id): also keeps file names inside the folder (no "/").

# R4 request-intent codes that authorize someone to act (valueset-request-intent.html): "order" and
# its specializations. proposal, plan, directive and option do not, so they get no worklist item.
_ACTIONABLE_INTENTS = frozenset({"order", "original-order", "reflex-order", "filler-order", "instance-order"})
# R4 request-status (valueset-request-status.html) values that withdraw a scheduled step: the order
# is over (completed), cancelled (revoked), never valid (entered-in-error), or suspended (on-hold:
# the modality must not start it; re-activating the order writes the item again).
_WITHDRAWN_STATUSES = frozenset({"revoked", "completed", "entered-in-error", "on-hold"})


class WorklistFolder:
    """One `<ServiceRequest id>.wl` file per scheduled order, in `path` (created when missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)

    def _file(self, service_request_id: str) -> Path:
        if not is_fhir_id(service_request_id):
            raise ValueError(f"service_request_id {service_request_id!r} is not a FHIR id")
        return self.path / f"{service_request_id}{_SUFFIX}"

    def write(self, service_request_id: str, ds: Dataset) -> Path:
        """Write (or replace) the item atomically as a DICOM Part 10 file (PS3.10 7.1); return its path."""
        target = self._file(service_request_id)
        handle, temporary = tempfile.mkstemp(dir=self.path, prefix=f".{service_request_id}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                ds.save_as(stream, enforce_file_format=True)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return target

    def remove(self, service_request_id: str) -> bool:
        """Delete the item; False when there was none (removal is idempotent)."""
        try:
            self._file(service_request_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def list_ids(self) -> list[str]:
        """The ServiceRequest ids that have an item, sorted."""
        return sorted(path.name.removesuffix(_SUFFIX) for path in self.path.glob(f"*{_SUFFIX}"))


def is_schedulable(service_request: Mapping[str, Any]) -> bool:
    """An active order with an order intent: what the modality is to perform (worklist item or Task)."""
    return service_request.get("status") == "active" and service_request.get("intent") in _ACTIONABLE_INTENTS


def sync_service_request(
    folder: WorklistFolder,
    service_request: Mapping[str, Any],
    patient: Mapping[str, Any] | None,
    *,
    station_ae_title: str = DEFAULT_STATION_AE_TITLE,
    stations: Mapping[str, str] | None = None,
    catalogue: ProcedureCatalogue | None = None,
) -> SyncResult:
    """Make the worklist reflect one ServiceRequest's R4 status (servicerequest.html#status).

    active with an order intent -> the item is written ("written"); revoked, completed,
    entered-in-error, on-hold -> the item is removed ("removed", or "skipped" when there was none);
    draft, unknown, and active non-order intents (proposal, plan, directive, option) -> no change
    ("skipped"). Mapping failures of an active order raise `WorklistMappingError` (`ModalityNotDerived`
    when neither a DCM coding nor the procedure `catalogue` gives the modality).
    """
    request_id = service_request.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise WorklistMappingError("an id is needed to name the worklist item", "ServiceRequest.id")
    status = service_request.get("status")
    if is_schedulable(service_request):
        item = worklist_item(
            service_request,
            patient,
            station_ae_title=station_ae_title,
            stations=stations,
            catalogue=catalogue,
        )
        folder.write(request_id, item)
        return "written"
    if status in _WITHDRAWN_STATUSES:
        return "removed" if folder.remove(request_id) else "skipped"
    return "skipped"
