"""Background watchers of the PACS: new stable studies from Orthanc's change feed, for Task creation."""

from fhir_facade.watcher.change_feed import (
    FeedPositionStore,
    FilePositionStore,
    StudyArrivalWatcher,
    StudyArrived,
    TaskRule,
)

__all__ = ["FeedPositionStore", "FilePositionStore", "StudyArrivalWatcher", "StudyArrived", "TaskRule"]
