"""The persistent FHIR resource store (SQLite or PostgreSQL): versions, history, search indexes
(docs/adr/0004-persistent-store.md)."""

from fhir_facade.store.engine import create_store_engine
from fhir_facade.store.indexing import INDEXED_PARAMS, IndexedParam, search_param_defs, sortable_params
from fhir_facade.store.migrations import MIGRATIONS, upgrade
from fhir_facade.store.repository import ResourceStore

__all__ = [
    "INDEXED_PARAMS",
    "MIGRATIONS",
    "IndexedParam",
    "ResourceStore",
    "create_store_engine",
    "search_param_defs",
    "sortable_params",
    "upgrade",
]
