"""The store's tables (SQLModel): versions, the current-version pointer, and search index rows.

- `resource_version` keeps every version ever written (FHIR http.html#history needs them, vread
  reads them); the JSON is stored as text exactly as returned, so reads never re-serialise.
- `resource_current` is one row per logical resource: the version a read returns, whether it is
  deleted, and its lastUpdated (the stable search order). Writers lock this row (SELECT ... FOR
  UPDATE) so concurrent updates of one resource queue instead of forking version numbers.
- `search_*` rows index the *current* version only and are replaced on every write; a search
  parameter is an `IN` semi-join on them (FHIR search.html, one table per search parameter type).

All timestamps are stored in UTC (`UtcDateTime`): SQLite keeps datetimes as text without an
offset, so comparing them as text is only correct when every value is in the same zone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime, ForeignKeyConstraint, Index, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = [
    "OutboxEntry",
    "ResourceCurrent",
    "ResourceVersion",
    "SchemaVersion",
    "SearchDate",
    "SearchReference",
    "SearchString",
    "SearchToken",
    "UtcDateTime",
]

#: FHIR ids are at most 64 characters (datatypes.html#id); type names are far shorter.
_ID_LENGTH = 64


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime stored in UTC; naive values are rejected (a bug, not data)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} cannot be stored; give it a timezone")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_column(**kwargs: Any) -> Any:
    return Field(sa_column=Column(UtcDateTime(), **kwargs))


class SchemaVersion(SQLModel, table=True):
    """One row per applied migration (`fhir_facade.store.migrations`)."""

    __tablename__ = "schema_version"

    version: int = Field(primary_key=True)
    description: str
    applied_at: datetime = _utc_column(nullable=False)


class ResourceVersion(SQLModel, table=True):
    """One version of one resource (FHIR http.html#versioning); deleted versions keep a stub."""

    __tablename__ = "resource_version"

    resource_type: str = Field(primary_key=True, max_length=_ID_LENGTH)
    resource_id: str = Field(primary_key=True, max_length=_ID_LENGTH)
    version_id: int = Field(primary_key=True)
    last_updated: datetime = _utc_column(nullable=False)
    deleted: bool = False
    resource_json: str = Field(sa_column=Column(Text, nullable=False))
    #: The principal that wrote this version (store/authorship.py); None: the server itself.
    author: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class ResourceCurrent(SQLModel, table=True):
    """The version a read returns; the row writers lock; the key search and index rows hang off."""

    __tablename__ = "resource_current"
    __table_args__ = (
        ForeignKeyConstraint(
            ["resource_type", "resource_id", "version_id"],
            ["resource_version.resource_type", "resource_version.resource_id", "resource_version.version_id"],
        ),
        Index("ix_resource_current_order", "resource_type", "last_updated", "resource_id"),
    )

    resource_type: str = Field(primary_key=True, max_length=_ID_LENGTH)
    resource_id: str = Field(primary_key=True, max_length=_ID_LENGTH)
    version_id: int
    last_updated: datetime = _utc_column(nullable=False)
    deleted: bool = False


def _owner_fk(table: str) -> ForeignKeyConstraint:
    return ForeignKeyConstraint(
        ["resource_type", "resource_id"],
        ["resource_current.resource_type", "resource_current.resource_id"],
        name=f"fk_{table}_resource",
        ondelete="CASCADE",
    )


class SearchToken(SQLModel, table=True):
    """A token search value (search.html#token): code, Coding, CodeableConcept, Identifier.
    `system` is NULL when the value has none (so `|code` can ask for exactly that)."""

    __tablename__ = "search_token"
    __table_args__ = (
        _owner_fk("search_token"),
        Index("ix_search_token_lookup", "resource_type", "param", "code"),
        Index("ix_search_token_owner", "resource_type", "resource_id", "param"),
    )

    row_id: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=_ID_LENGTH)
    resource_id: str = Field(max_length=_ID_LENGTH)
    param: str = Field(max_length=_ID_LENGTH)
    system: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    code: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class SearchDate(SQLModel, table=True):
    """A date search value as the half-open UTC range [lower, upper) it covers (search.html#date)."""

    __tablename__ = "search_date"
    __table_args__ = (
        _owner_fk("search_date"),
        Index("ix_search_date_lookup", "resource_type", "param", "lower", "upper"),
        Index("ix_search_date_owner", "resource_type", "resource_id", "param", "lower"),
    )

    row_id: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=_ID_LENGTH)
    resource_id: str = Field(max_length=_ID_LENGTH)
    param: str = Field(max_length=_ID_LENGTH)
    lower: datetime = _utc_column(nullable=False)
    upper: datetime = _utc_column(nullable=False)


class SearchReference(SQLModel, table=True):
    """A Reference search value (search.html#reference): `target_type`/`target_id` when the
    reference is relative (or under an absolute base), and the reference string as written."""

    __tablename__ = "search_reference"
    __table_args__ = (
        _owner_fk("search_reference"),
        Index("ix_search_reference_lookup", "resource_type", "param", "target_id"),
        Index("ix_search_reference_owner", "resource_type", "resource_id", "param"),
    )

    row_id: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=_ID_LENGTH)
    resource_id: str = Field(max_length=_ID_LENGTH)
    param: str = Field(max_length=_ID_LENGTH)
    target_type: str | None = Field(default=None, max_length=_ID_LENGTH)
    target_id: str | None = Field(default=None, max_length=_ID_LENGTH)
    reference: str = Field(sa_column=Column(Text, nullable=False))


class SearchString(SQLModel, table=True):
    """A string search value (search.html#string): normalised (case and accents folded) for the
    default starts-with match, and as written for `:exact`."""

    __tablename__ = "search_string"
    __table_args__ = (
        _owner_fk("search_string"),
        Index("ix_search_string_lookup", "resource_type", "param", "normalized"),
        Index("ix_search_string_owner", "resource_type", "resource_id", "param", "normalized"),
    )

    row_id: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=_ID_LENGTH)
    resource_id: str = Field(max_length=_ID_LENGTH)
    param: str = Field(max_length=_ID_LENGTH)
    normalized: str = Field(sa_column=Column(Text, nullable=False))
    exact: str = Field(sa_column=Column(Text, nullable=False))


class OutboxEntry(SQLModel, table=True):
    """One stored version waiting to be pushed upstream (created by migration 4, correlation_id
    by migration 5).

    `state`: pending -> sent, or dead (a non-transient upstream refusal, kept in `last_error`).
    A worker leases due rows (`lease_until`) in a short transaction and sends them outside it, so
    a slow upstream never holds a database lock that FHIR writes wait for.
    """

    __tablename__ = "outbox"

    seq: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=_ID_LENGTH)
    resource_id: str = Field(max_length=_ID_LENGTH)
    version_id: int
    deleted: bool
    created_at: datetime = _utc_column(nullable=False)
    state: str = Field(max_length=16)
    attempts: int
    next_attempt_at: datetime = _utc_column(nullable=False)
    lease_until: datetime | None = _utc_column(nullable=True)
    sent_at: datetime | None = _utc_column(nullable=True)
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: X-Correlation-ID of the request that wrote the version (migration 5); None for writes
    #: outside a request and for rows older than the column.
    correlation_id: str | None = Field(default=None, max_length=128)
