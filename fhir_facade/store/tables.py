"""The store's tables as SQLAlchemy Core `Table`s (schema.py declares them), shared by the write,
read and search modules, and the join from a resource's current pointer to its version row."""

from __future__ import annotations

from sqlalchemy import ColumnElement, Table, and_

from fhir_facade.fhir.search import SearchParamType
from fhir_facade.store.schema import (
    ResourceCurrent,
    ResourceVersion,
    SearchDate,
    SearchReference,
    SearchString,
    SearchToken,
)

__all__ = [
    "CURRENT",
    "DATE",
    "INDEX_TABLES",
    "REFERENCE",
    "STRING",
    "TABLE_BY_TYPE",
    "TOKEN",
    "VERSION",
    "current_version_join",
]

VERSION: Table = ResourceVersion.__table__  # type: ignore[attr-defined]
CURRENT: Table = ResourceCurrent.__table__  # type: ignore[attr-defined]
TOKEN: Table = SearchToken.__table__  # type: ignore[attr-defined]
DATE: Table = SearchDate.__table__  # type: ignore[attr-defined]
REFERENCE: Table = SearchReference.__table__  # type: ignore[attr-defined]
STRING: Table = SearchString.__table__  # type: ignore[attr-defined]
INDEX_TABLES = (TOKEN, DATE, REFERENCE, STRING)
#: The index table of each indexed search parameter type.
TABLE_BY_TYPE = {
    SearchParamType.TOKEN: TOKEN,
    SearchParamType.DATE: DATE,
    SearchParamType.REFERENCE: REFERENCE,
    SearchParamType.STRING: STRING,
}


def current_version_join() -> ColumnElement[bool]:
    return and_(
        VERSION.c.resource_type == CURRENT.c.resource_type,
        VERSION.c.resource_id == CURRENT.c.resource_id,
        VERSION.c.version_id == CURRENT.c.version_id,
    )
