"""Background watchers of the PACS: new stable studies from Orthanc's change feed, for Task creation."""

from fhir_facade.watcher.change_feed import (
    ArrivedStudy,
    FeedPositionStore,
    FilePositionStore,
    StudyArrivalWatcher,
    TaskRule,
)

__all__ = ["ArrivedStudy", "FeedPositionStore", "FilePositionStore", "StudyArrivalWatcher", "TaskRule"]
