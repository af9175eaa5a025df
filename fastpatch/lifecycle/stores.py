"""Open the store a ``--store`` value names: a folder (SQLite) or a ``postgresql://`` URL.

Apart from :mod:`.store` (the interface and the SQLite store) and :mod:`.pg_store` (which builds on
the interface), so that neither imports the other.
"""
from __future__ import annotations

from .store import SQLiteStore, Store, StoreError


_URL_SCHEMES = ("postgresql://", "postgres://")


def open_store(target, *, create: bool = True) -> Store:
    """The store a ``--store`` value names: ``postgresql://user:pw@host:port/db`` (or ``postgres://``) opens a
    :class:`~.pg_store.PostgresStore`; anything else is a directory for a :class:`SQLiteStore`.
    ``create=False`` opens an existing store only (:class:`StoreNotFound` otherwise, nothing created)."""
    text = str(target)
    if text.startswith(_URL_SCHEMES):
        from .pg_store import PostgresStore  # lazily: psycopg is only needed for a URL

        return PostgresStore(text, create=create)
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme is not None and "/" not in scheme:
        raise StoreError(f"unknown store URL scheme {scheme!r} in {text!r}: give a directory (SQLite store) or a "
                         "postgresql://user@host:port/dbname URL")
    return SQLiteStore(text, create=create)
