"""Where the registry keeps its state: an interface, and the embedded default (SQLite in WAL mode plus a
content-addressed directory of patch files).

Everything the governance layer knows lives here: patch sets (with their policy), versions (with the
digests of their patch files and an optional expiry), rollout state, the audit log, telemetry counters
and alerts. Every change is one transaction that also appends its audit entry and bumps a generation
counter, so

- a crash (kill -9) at any point leaves either the whole change or none of it, never half a version;
- a change is acknowledged (the method returns) only after its transaction committed with
  ``synchronous=FULL``: nothing acknowledged is lost;
- readers in other processes (serving replicas) see a change by polling :meth:`Store.generation`,
  one indexed read, and reload only when it moved.

Patch files are written to ``blobs/sha256/<2 hex>/<62 hex>`` *before* the transaction that refers to
them (temp file, fsync, rename, fsync of the directory), so a committed version never names a missing
file; a crash between the two leaves at most an unreferenced blob (``gc_blobs`` removes those).

This module is pure standard library on purpose: the crash tests start a writer process many times and
must not pay for importing torch.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

SCHEMA_VERSION = 1
_DIGEST_HEX = frozenset("0123456789abcdef")


class StoreError(RuntimeError):
    """The store refused a change (conflict, unknown name) or found itself inconsistent."""


class StoreNotFound(StoreError):
    """``SQLiteStore(dir, create=False)`` on a directory that holds no store."""


class Conflict(StoreError):
    """A change that contradicts the stored state (version exists, not newer, unknown set)."""


def _now() -> float:
    return time.time()


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _DIGEST_HEX:
        raise StoreError(f"not a sha256 hex digest: {digest!r}")
    return digest


class Store(abc.ABC):
    """The storage interface the governance layer uses; :class:`SQLiteStore` is the embedded default.

    A shared database (PostgreSQL, see docs/lifecycle.md) implements the same methods: each mutating
    method is one transaction that also appends the audit entry and increments the generation.
    ``mutate`` functions receive the current JSON-able value and return the new one; implementations
    must run them under the row's write lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR
    UPDATE``) so read-modify-write cannot lose an update.
    """

    # blobs (patch files, content-addressed)
    @abc.abstractmethod
    def put_blob(self, data: bytes) -> str: ...
    @abc.abstractmethod
    def get_blob(self, digest: str) -> bytes:
        """The blob's bytes, verified against ``digest`` (StoreError if missing or corrupted)."""

    def blob_path(self, digest: str) -> Path:
        """Where a file-backed store keeps a blob (a database-backed store has no such path)."""
        _check_digest(digest)
        raise StoreError(f"{type(self).__name__} keeps patch files in its database, not as files; read them "
                         "with get_blob(digest)")

    # patch sets and versions
    @abc.abstractmethod
    def create_set(self, name: str, policy: dict, *, actor: str, audit: Optional[dict] = None) -> None: ...
    @abc.abstractmethod
    def get_set(self, name: str) -> Optional[dict]: ...
    @abc.abstractmethod
    def list_sets(self) -> list: ...
    @abc.abstractmethod
    def update_set(self, name: str, field: str, mutate: Callable[[dict], dict], *, actor: str, action: str,
                   audit: Optional[dict] = None) -> dict: ...
    @abc.abstractmethod
    def add_version(self, name: str, version: str, sort_key: list, record: dict, *, actor: str,
                    audit: Optional[dict] = None) -> None: ...
    @abc.abstractmethod
    def get_version(self, name: str, version: str) -> Optional[dict]: ...
    @abc.abstractmethod
    def list_versions(self, name: str) -> list: ...
    @abc.abstractmethod
    def update_version(self, name: str, version: str, mutate: Callable[[dict], dict], *, actor: str,
                       action: str, audit: Optional[dict] = None) -> dict: ...

    # audit, telemetry, alerts, change detection
    @abc.abstractmethod
    def append_audit(self, actor: str, action: str, fields: dict) -> dict: ...
    @abc.abstractmethod
    def audit(self, *, name: Optional[str] = None, since: int = 0, limit: Optional[int] = None) -> list: ...
    @abc.abstractmethod
    def add_telemetry(self, rows: Iterable[tuple]) -> None: ...
    @abc.abstractmethod
    def telemetry(self) -> list: ...
    @abc.abstractmethod
    def add_alert(self, alert: dict) -> dict: ...
    @abc.abstractmethod
    def alerts(self, *, name: Optional[str] = None) -> list: ...
    @abc.abstractmethod
    def generation(self) -> int: ...
    @abc.abstractmethod
    def snapshot(self) -> dict:
        """Everything serving needs, read consistently (one read transaction): {"generation": g,
        "sets": {name: {"policy", "rollout", "versions": {version: record}}}}."""

    def wait_for_change(self, after: int, timeout_s: float) -> int:
        """Block until :meth:`generation` exceeds ``after`` or ``timeout_s`` passed; returns the generation.
        This default polls; :class:`~.pg_store.PostgresStore` is woken by NOTIFY instead."""
        deadline = time.monotonic() + float(timeout_s)
        while True:
            gen = self.generation()
            if gen > after or time.monotonic() >= deadline:
                return gen
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sets (
    name TEXT PRIMARY KEY, created REAL NOT NULL, policy TEXT NOT NULL, rollout TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES sets(name), version TEXT NOT NULL, sort_key TEXT NOT NULL,
    record TEXT NOT NULL, published REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    name TEXT, fields TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_name ON audit(name, id);
CREATE TABLE IF NOT EXISTS telemetry (
    name TEXT NOT NULL, version TEXT NOT NULL, arm TEXT NOT NULL, metric TEXT NOT NULL,
    n INTEGER NOT NULL, total REAL NOT NULL, total_sq REAL NOT NULL,
    PRIMARY KEY (name, version, arm, metric));
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL);
"""


class SQLiteStore(Store):
    """``SQLiteStore(directory)``: ``directory/registry.db`` (WAL) and ``directory/blobs/``.

    Safe to share between threads (one connection per thread) and between processes on one machine
    (SQLite's file locks; writers wait up to ``busy_timeout_s``). ``create=False`` opens an existing store
    only: a directory without ``registry.db`` raises :class:`StoreNotFound` and nothing is created.
    """

    def __init__(self, directory, *, busy_timeout_s: float = 30.0, create: bool = True):
        self.root = Path(directory)
        if not create and not (self.root / "registry.db").is_file():
            why = "does not exist" if not self.root.exists() else (
                "is not a directory" if not self.root.is_dir() else "holds no registry store (no registry.db)")
            raise StoreNotFound(f"{self.root} {why}; check the store path (a store is created by publishing "
                                "into it)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = self.root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "registry.db"
        self._timeout = float(busy_timeout_s)
        self._tls = threading.local()
        self._all: list = []
        self._all_lock = threading.Lock()
        conn = self._conn()
        schema = self._schema_version(conn)
        if schema is None:  # a new store (opening an existing one writes nothing: no wait on busy writers)
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', 0)")
            conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            schema = self._schema_version(conn)
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {schema}, this fastpatch reads {SCHEMA_VERSION}")

    @staticmethod
    def _schema_version(conn) -> Optional[int]:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return None
        return None if row is None else int(row[0])

    # -- connections ----------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._tls, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN / COMMIT ourselves (BEGIN IMMEDIATE for writers).
            conn = sqlite3.connect(str(self.path), timeout=self._timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode.lower() != "wal":  # switching needs a lock: only a new store does it
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")  # a returned write survives a crash or power loss
            conn.execute("PRAGMA foreign_keys=ON")
            self._tls.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _write(self):
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front: no upgrade deadlock)."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
            c.execute("UPDATE meta SET value = value + 1 WHERE key='generation'")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    @staticmethod
    def _audit(c, actor: str, action: str, name: Optional[str], fields: dict) -> dict:
        ts = _now()
        body = json.dumps(fields, sort_keys=True, allow_nan=False)
        cur = c.execute("INSERT INTO audit(ts, actor, action, name, fields) VALUES (?, ?, ?, ?, ?)",
                        (ts, actor, action, name, body))
        return {"id": cur.lastrowid, "ts": ts, "actor": actor, "action": action, "name": name, **fields}

    # -- blobs ----------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.blobs / digest[:2] / digest[2:]

    def put_blob(self, data: bytes) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a blob is bytes, got {type(data).__name__}")
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        try:  # already stored intact: nothing to write (a corrupted copy is replaced below)
            if path.stat().st_size == len(data) and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                return digest
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return digest

    def get_blob(self, digest: str) -> bytes:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"patch file blob {digest[:12]}… is missing from {self.blobs}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"patch file blob {digest[:12]}… is corrupted (content hash differs)")
        return data

    def gc_blobs(self) -> list:
        """Delete blobs no version refers to (left by a crash between writing a blob and committing)."""
        used = set()
        for (rec,) in self._conn().execute("SELECT record FROM versions"):
            used.update(json.loads(rec).get("blobs", {}).values())
        removed = []
        for p in self.blobs.glob("*/*"):
            digest = p.parent.name + p.name
            if p.name.startswith(".") or digest not in used:
                p.unlink()
                removed.append(digest)
        return removed

    # -- sets -----------------------------------------------------------------------------------
    def create_set(self, name, policy, *, actor, audit=None) -> None:
        with self._write() as c:
            if c.execute("SELECT 1 FROM sets WHERE name=?", (name,)).fetchone():
                raise Conflict(f"patch set {name!r} already exists")
            c.execute("INSERT INTO sets(name, created, policy, rollout) VALUES (?, ?, ?, ?)",
                      (name, _now(), json.dumps(policy, allow_nan=False), json.dumps({})))
            self._audit(c, actor, "create_set", name, dict(audit or {}, policy=policy))

    def _set_row(self, c, name):
        row = c.execute("SELECT name, created, policy, rollout FROM sets WHERE name=?", (name,)).fetchone()
        if row is None:
            return None
        return {"name": row[0], "created": row[1], "policy": json.loads(row[2]), "rollout": json.loads(row[3])}

    def get_set(self, name) -> Optional[dict]:
        return self._set_row(self._conn(), name)

    def list_sets(self) -> list:
        return [r[0] for r in self._conn().execute("SELECT name FROM sets ORDER BY name")]

    def update_set(self, name, field, mutate, *, actor, action, audit=None) -> dict:
        if field not in ("policy", "rollout"):
            raise StoreError(f"unknown set field {field!r}")
        with self._write() as c:
            row = self._set_row(c, name)
            if row is None:
                raise Conflict(f"no patch set named {name!r}")
            new = mutate(row[field])
            c.execute(f"UPDATE sets SET {field}=? WHERE name=?", (json.dumps(new, allow_nan=False), name))
            self._audit(c, actor, action, name, dict(audit or {}))
            return new

    # -- versions -------------------------------------------------------------------------------
    def add_version(self, name, version, sort_key, record, *, actor, audit=None) -> None:
        for digest in record.get("blobs", {}).values():
            if not self.blob_path(digest).exists():
                raise StoreError(f"{name}@{version}: blob {digest[:12]}… was not stored first")
        key = json.dumps(sort_key)
        with self._write() as c:
            if c.execute("SELECT 1 FROM sets WHERE name=?", (name,)).fetchone() is None:
                raise Conflict(f"no patch set named {name!r}")
            if c.execute("SELECT 1 FROM versions WHERE name=? AND version=?", (name, version)).fetchone():
                raise Conflict(f"{name}@{version} is already published; versions are immutable, publish a "
                               "new version")
            newest = None
            for v, k in c.execute("SELECT version, sort_key FROM versions WHERE name=?", (name,)):
                if newest is None or json.loads(k) > newest[1]:
                    newest = (v, json.loads(k))
            if newest is not None and newest[1] >= sort_key:
                raise Conflict(f"{name}@{version} is not newer than the latest published version {newest[0]}")
            c.execute("INSERT INTO versions(name, version, sort_key, record, published) VALUES (?, ?, ?, ?, ?)",
                      (name, version, key, json.dumps(record, allow_nan=False), _now()))
            self._audit(c, actor, "publish", name, dict(audit or {}, version=version))

    @staticmethod
    def _version_row(row) -> dict:
        return dict(json.loads(row[2]), name=row[0], version=row[1], published=row[3])

    def get_version(self, name, version) -> Optional[dict]:
        row = self._conn().execute("SELECT name, version, record, published FROM versions WHERE name=? AND "
                                   "version=?", (name, version)).fetchone()
        return None if row is None else self._version_row(row)

    def list_versions(self, name) -> list:
        rows = self._conn().execute("SELECT name, version, record, published, sort_key FROM versions WHERE name=?",
                                    (name,)).fetchall()
        rows.sort(key=lambda r: json.loads(r[4]))
        return [self._version_row(r) for r in rows]

    def update_version(self, name, version, mutate, *, actor, action, audit=None) -> dict:
        with self._write() as c:
            row = c.execute("SELECT name, version, record, published FROM versions WHERE name=? AND version=?",
                            (name, version)).fetchone()
            if row is None:
                raise Conflict(f"{name!r} has no version {version!r}")
            rec = json.loads(row[2])
            new = mutate(rec)
            c.execute("UPDATE versions SET record=? WHERE name=? AND version=?",
                      (json.dumps(new, allow_nan=False), name, version))
            self._audit(c, actor, action, name, dict(audit or {}, version=version))
            return dict(new, name=name, version=version, published=row[3])

    # -- audit, telemetry, alerts ---------------------------------------------------------------
    def append_audit(self, actor, action, fields) -> dict:
        fields = dict(fields)
        name = fields.pop("name", None)
        with self._write() as c:
            return self._audit(c, actor, action, name, fields)

    def audit(self, *, name=None, since=0, limit=None) -> list:
        q = "SELECT id, ts, actor, action, name, fields FROM audit WHERE id > ?"
        args: list = [int(since)]
        if name is not None:
            q += " AND name = ?"
            args.append(name)
        q += " ORDER BY id"
        if limit is not None:
            q += " LIMIT ?"
            args.append(int(limit))
        out = []
        for i, ts, actor, action, nm, fields in self._conn().execute(q, args):
            entry = {"id": i, "ts": ts, "actor": actor, "action": action, "name": nm}
            entry.update(json.loads(fields))
            out.append(entry)
        return out

    def add_telemetry(self, rows) -> None:
        """Add counters: rows of (name, version, arm, metric, n, total, total_sq)."""
        rows = list(rows)
        if not rows:
            return
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")  # telemetry is not a change of state: no generation bump, no audit
        try:
            c.executemany(
                "INSERT INTO telemetry(name, version, arm, metric, n, total, total_sq) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(name, version, arm, metric) DO UPDATE SET n = n + excluded.n, "
                "total = total + excluded.total, total_sq = total_sq + excluded.total_sq", rows)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def telemetry(self) -> list:
        return [dict(zip(("name", "version", "arm", "metric", "n", "total", "total_sq"), r))
                for r in self._conn().execute("SELECT name, version, arm, metric, n, total, total_sq FROM "
                                              "telemetry ORDER BY name, version, arm, metric")]

    def add_alert(self, alert) -> dict:
        with self._write() as c:
            cur = c.execute("INSERT INTO alerts(ts, name, body) VALUES (?, ?, ?)",
                            (alert.get("ts", _now()), alert["name"], json.dumps(alert, allow_nan=False)))
            self._audit(c, alert.get("actor", "monitor"), "alert", alert["name"],
                        {k: v for k, v in alert.items() if k not in ("name", "actor")})
            return dict(alert, id=cur.lastrowid)

    def alerts(self, *, name=None) -> list:
        q, args = "SELECT id, body FROM alerts", []
        if name is not None:
            q, args = q + " WHERE name=?", [name]
        return [dict(json.loads(b), id=i) for i, b in self._conn().execute(q + " ORDER BY id", args)]

    def generation(self) -> int:
        return int(self._conn().execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def snapshot(self) -> dict:
        c = self._conn()
        c.execute("BEGIN")  # a WAL read transaction: one consistent view across the statements below
        try:
            gen = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            sets = {}
            for name, created, policy, rollout in c.execute("SELECT name, created, policy, rollout FROM sets"):
                sets[name] = {"name": name, "created": created, "policy": json.loads(policy),
                              "rollout": json.loads(rollout), "versions": {}}
            for row in c.execute("SELECT name, version, record, published FROM versions"):
                sets[row[0]]["versions"][row[1]] = self._version_row(row)
        finally:
            c.execute("COMMIT")
        return {"generation": gen, "sets": sets}

    def integrity(self) -> list:
        """Problems found: SQLite's integrity check, and versions whose blobs are missing or corrupted."""
        c = self._conn()
        problems = [r[0] for r in c.execute("PRAGMA integrity_check") if r[0] != "ok"]
        for (name, version, rec) in c.execute("SELECT name, version, record FROM versions"):
            for pname, digest in json.loads(rec).get("blobs", {}).items():
                try:
                    self.get_blob(digest)
                except StoreError as exc:
                    problems.append(f"{name}@{version} {pname}: {exc}")
        return problems

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all = []
        self._tls = threading.local()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
