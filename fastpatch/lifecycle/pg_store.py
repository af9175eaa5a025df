"""The registry store on PostgreSQL: one database shared by every machine of a fleet.

``PostgresStore("postgresql://user@host/dbname")`` implements :class:`~.store.Store` with the same
guarantees as :class:`~.store.SQLiteStore`, for serving replicas and operators on many machines:

- every change is one transaction that takes the generation row's lock first (``UPDATE ... RETURNING``:
  writers are serialised, so read-modify-write of a set's rollout or a version's record cannot lose an
  update), applies the change, appends its audit entry, bumps the generation and sends ``NOTIFY
  fastpatch_changes`` (delivered only when the transaction commits); a client killed mid-change leaves
  nothing (the server rolls the open transaction back), and a change is acknowledged only after
  ``COMMIT`` returned (PostgreSQL's ``synchronous_commit=on``: it is in the WAL on disk);
- patch files are content-addressed rows of ``fastpatch_blobs`` (``bytea`` keyed by the sha256 of the
  bytes, verified on every read), committed *before* the version that names them; ``add_version`` checks
  under the lock that they are there, so a committed version never names a missing blob;
- readers see changes by polling :meth:`generation` (one primary-key read) or by blocking in
  :meth:`wait_for_change` (``LISTEN fastpatch_changes``); :meth:`snapshot` reads everything in one
  ``REPEATABLE READ`` transaction, so it is consistent with the generation it reports.

Tables are named ``fastpatch_*`` and live in the connection's ``search_path`` (default ``public``): give a
schema per registry with ``?options=-csearch_path%3Dmyschema`` in the URL. Needs psycopg 3.2 or newer
(``pip install "psycopg[binary]"``).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .store import SCHEMA_VERSION, Conflict, Store, StoreError, StoreNotFound, _check_digest, _now

CHANNEL = "fastpatch_changes"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fastpatch_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS fastpatch_sets (
    name TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL, policy TEXT NOT NULL, rollout TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fastpatch_versions (
    name TEXT NOT NULL REFERENCES fastpatch_sets(name), version TEXT NOT NULL, sort_key TEXT NOT NULL,
    record TEXT NOT NULL, published DOUBLE PRECISION NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS fastpatch_audit (
    id BIGINT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    name TEXT, fields TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS fastpatch_audit_name ON fastpatch_audit(name, id);
CREATE TABLE IF NOT EXISTS fastpatch_telemetry (
    name TEXT NOT NULL, version TEXT NOT NULL, arm TEXT NOT NULL, metric TEXT NOT NULL,
    n BIGINT NOT NULL, total DOUBLE PRECISION NOT NULL, total_sq DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, version, arm, metric));
CREATE TABLE IF NOT EXISTS fastpatch_alerts (
    id BIGINT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fastpatch_blobs (
    digest TEXT PRIMARY KEY CHECK (digest ~ '^[0-9a-f]{64}$'), size BIGINT NOT NULL, data BYTEA NOT NULL,
    created DOUBLE PRECISION NOT NULL);
"""


def redact(dsn: str) -> str:
    """The URL without its password (for messages and logs)."""
    dsn = re.sub(r"(://[^:/@?#]*):[^@/?#]*@", r"\1:***@", dsn)
    return re.sub(r"(password=)[^&\s]*", r"\1***", dsn)


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise StoreError("a postgresql:// store needs psycopg 3 (the PostgreSQL driver); install it with "
                         "pip install \"psycopg[binary]\"") from None
    return psycopg


class PostgresStore(Store):
    """``PostgresStore(url)``: the registry in a PostgreSQL database (``postgresql://user:pw@host:port/db``).

    Safe to share between threads (each call borrows a connection from a small pool of idle ones, so a
    server with a thread per HTTP connection does not hold a database connection per thread; a dropped
    connection is replaced), processes and machines. ``create=False`` opens an existing registry only: a
    database without the fastpatch tables raises :class:`~.store.StoreNotFound` and nothing is created.
    """

    def __init__(self, dsn: str, *, create: bool = True, connect_timeout_s: float = 10.0,
                 lock_timeout_s: float = 30.0, max_idle_connections: int = 8):
        self.psycopg = _psycopg()
        self.dsn = str(dsn)
        self.url = redact(self.dsn)
        self._connect_timeout = max(1, int(round(connect_timeout_s)))
        self._lock_timeout_ms = int(lock_timeout_s * 1000)
        self._idle: list = []
        self._max_idle = int(max_idle_connections)
        self._pool_lock = threading.Lock()
        self._listener = None
        self._listen_lock = threading.Lock()
        try:
            with self._errors("opening the registry"), self._use() as c:
                self._open(c, create)
        except BaseException:
            self.close()
            raise

    def _open(self, c, create: bool) -> None:
        schema = self._schema_version(c)
        if schema is None:
            if not create:
                path = c.execute("SHOW search_path").fetchone()[0]
                raise StoreNotFound(f"{self.url}: database {c.info.dbname!r} holds no fastpatch registry (no table "
                                    f"fastpatch_meta in search_path {path!r}); check the URL (database name, "
                                    "options=-csearch_path) - a store is created by publishing into it")
            with self._errors("creating the registry tables"), c.transaction():
                # Two processes creating the same new store at once: one creates, the other finds it made.
                c.execute("SELECT pg_advisory_xact_lock(hashtext('fastpatch registry schema'))")
                if self._schema_version(c) is None:
                    c.execute(_SCHEMA)
                    c.execute("INSERT INTO fastpatch_meta(key, value) VALUES ('generation', 0), ('schema', %s) "
                              "ON CONFLICT (key) DO NOTHING", (SCHEMA_VERSION,))
            schema = self._schema_version(c)
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{self.url}: registry schema version {schema}, this fastpatch reads {SCHEMA_VERSION}; "
                             "use the fastpatch release that wrote it")

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    @staticmethod
    def _schema_version(c) -> Optional[int]:
        if c.execute("SELECT to_regclass('fastpatch_meta')").fetchone()[0] is None:
            return None
        row = c.execute("SELECT value FROM fastpatch_meta WHERE key='schema'").fetchone()
        return None if row is None else int(row[0])

    # -- connections ----------------------------------------------------------------------------
    @contextmanager
    def _errors(self, doing: str):
        """psycopg's connection-level failures as StoreError naming the server and what to check."""
        try:
            yield
        except self.psycopg.OperationalError as exc:
            msg = " ".join(str(exc).split())
            raise StoreError(f"PostgreSQL at {self.url}: {doing} failed: {msg}; check that the server runs and "
                             "accepts this URL (host, port, database, user, password)") from None

    def _connect(self):
        with self._errors("connecting"):
            conn = self.psycopg.connect(self.dsn, autocommit=True, connect_timeout=self._connect_timeout,
                                        application_name="fastpatch-registry")
            # A writer waits this long for the generation lock (another writer), then fails with a clear error.
            conn.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
            conn.execute("SET synchronous_commit = on")  # acknowledged = in the server's WAL on disk
        return conn

    @contextmanager
    def _use(self):
        """Borrow a connection (an idle one, or a new one) for one call; back to the pool if still clean."""
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed or conn.broken:
            conn = self._connect()
        try:
            yield conn
        finally:
            clean = (not conn.closed and not conn.broken
                     and conn.info.transaction_status == self.psycopg.pq.TransactionStatus.IDLE)
            with self._pool_lock:
                keep = clean and len(self._idle) < self._max_idle
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def _read(self):
        with self._errors("reading"), self._use() as c:
            yield c

    @contextmanager
    def _write(self):
        """One change: the generation row's lock first (writers in line), the change, its audit entry, NOTIFY."""
        with self._errors("writing"), self._use() as c, c.transaction():
            gen = c.execute("UPDATE fastpatch_meta SET value = value + 1 WHERE key='generation' "
                            "RETURNING value").fetchone()[0]
            yield c
            c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(gen)))

    @staticmethod
    def _audit(c, actor: str, action: str, name: Optional[str], fields: dict) -> dict:
        ts = _now()
        body = json.dumps(fields, sort_keys=True, allow_nan=False)
        # Ids are contiguous: assigned under the generation lock (a sequence would leave gaps on rollback).
        i = c.execute("INSERT INTO fastpatch_audit(id, ts, actor, action, name, fields) SELECT "
                      "coalesce(max(id), 0) + 1, %s, %s, %s, %s, %s FROM fastpatch_audit RETURNING id",
                      (ts, actor, action, name, body)).fetchone()[0]
        return {"id": int(i), "ts": ts, "actor": actor, "action": action, "name": name, **fields}

    # -- blobs ----------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        _check_digest(digest)
        raise StoreError(f"{self!r} keeps patch files in the database (table fastpatch_blobs), not as files; "
                         "read them with get_blob(digest)")

    def put_blob(self, data: bytes) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a blob is bytes, got {type(data).__name__}")
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        with self._read() as c:  # autocommit: committed before the version that will name it
            # A stored row whose bytes differ (corrupted) is repaired by storing the right bytes again.
            c.execute("INSERT INTO fastpatch_blobs(digest, size, data, created) VALUES (%s, %s, %s, %s) "
                      "ON CONFLICT (digest) DO UPDATE SET data = excluded.data, size = excluded.size "
                      "WHERE fastpatch_blobs.data <> excluded.data", (digest, len(data), data, _now()))
        return digest

    def get_blob(self, digest: str) -> bytes:
        _check_digest(digest)
        with self._read() as c:
            row = c.execute("SELECT data FROM fastpatch_blobs WHERE digest=%s", (digest,)).fetchone()
        if row is None:
            raise StoreError(f"patch file blob {digest[:12]}… is missing from table fastpatch_blobs of {self.url}")
        data = bytes(row[0])
        if hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"patch file blob {digest[:12]}… in {self.url} is corrupted (content hash differs); "
                             "publish the same patch file again to restore it")
        return data

    def gc_blobs(self) -> list:
        """Delete blobs no version refers to (left by a client that died between storing a blob and committing
        its version). Holds the generation lock meanwhile: a publish whose blob it removed fails cleanly."""
        with self._errors("collecting blobs"), self._use() as c, c.transaction():
            c.execute("SELECT value FROM fastpatch_meta WHERE key='generation' FOR UPDATE")
            used = set()
            for (rec,) in c.execute("SELECT record FROM fastpatch_versions"):
                used.update(json.loads(rec).get("blobs", {}).values())
            unused = [d for (d,) in c.execute("SELECT digest FROM fastpatch_blobs ORDER BY digest")
                      if d not in used]
            if unused:
                c.execute("DELETE FROM fastpatch_blobs WHERE digest = ANY(%s)", (unused,))
        return unused

    # -- sets -----------------------------------------------------------------------------------
    def create_set(self, name, policy, *, actor, audit=None) -> None:
        with self._write() as c:
            if c.execute("SELECT 1 FROM fastpatch_sets WHERE name=%s", (name,)).fetchone():
                raise Conflict(f"patch set {name!r} already exists")
            c.execute("INSERT INTO fastpatch_sets(name, created, policy, rollout) VALUES (%s, %s, %s, %s)",
                      (name, _now(), json.dumps(policy, allow_nan=False), json.dumps({})))
            self._audit(c, actor, "create_set", name, dict(audit or {}, policy=policy))

    @staticmethod
    def _set_row(c, name):
        row = c.execute("SELECT name, created, policy, rollout FROM fastpatch_sets WHERE name=%s",
                        (name,)).fetchone()
        if row is None:
            return None
        return {"name": row[0], "created": row[1], "policy": json.loads(row[2]), "rollout": json.loads(row[3])}

    def get_set(self, name) -> Optional[dict]:
        with self._read() as c:
            return self._set_row(c, name)

    def list_sets(self) -> list:
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT name FROM fastpatch_sets ORDER BY name")]

    def update_set(self, name, field, mutate, *, actor, action, audit=None) -> dict:
        if field not in ("policy", "rollout"):
            raise StoreError(f"unknown set field {field!r}")
        with self._write() as c:
            row = self._set_row(c, name)
            if row is None:
                raise Conflict(f"no patch set named {name!r}")
            new = mutate(row[field])
            c.execute(f"UPDATE fastpatch_sets SET {field}=%s WHERE name=%s", (json.dumps(new, allow_nan=False), name))
            self._audit(c, actor, action, name, dict(audit or {}))
            return new

    # -- versions -------------------------------------------------------------------------------
    def add_version(self, name, version, sort_key, record, *, actor, audit=None) -> None:
        digests = sorted(set(record.get("blobs", {}).values()))
        for digest in digests:
            _check_digest(digest)
        key = json.dumps(sort_key)
        with self._write() as c:
            have = {d for (d,) in c.execute("SELECT digest FROM fastpatch_blobs WHERE digest = ANY(%s)", (digests,))}
            for digest in digests:
                if digest not in have:
                    raise StoreError(f"{name}@{version}: blob {digest[:12]}… was not stored first")
            if c.execute("SELECT 1 FROM fastpatch_sets WHERE name=%s", (name,)).fetchone() is None:
                raise Conflict(f"no patch set named {name!r}")
            if c.execute("SELECT 1 FROM fastpatch_versions WHERE name=%s AND version=%s",
                         (name, version)).fetchone():
                raise Conflict(f"{name}@{version} is already published; versions are immutable, publish a "
                               "new version")
            newest = None
            for v, k in c.execute("SELECT version, sort_key FROM fastpatch_versions WHERE name=%s", (name,)):
                if newest is None or json.loads(k) > newest[1]:
                    newest = (v, json.loads(k))
            if newest is not None and newest[1] >= sort_key:
                raise Conflict(f"{name}@{version} is not newer than the latest published version {newest[0]}")
            c.execute("INSERT INTO fastpatch_versions(name, version, sort_key, record, published) "
                      "VALUES (%s, %s, %s, %s, %s)", (name, version, key, json.dumps(record, allow_nan=False), _now()))
            self._audit(c, actor, "publish", name, dict(audit or {}, version=version))

    @staticmethod
    def _version_row(row) -> dict:
        return dict(json.loads(row[2]), name=row[0], version=row[1], published=row[3])

    def get_version(self, name, version) -> Optional[dict]:
        with self._read() as c:
            row = c.execute("SELECT name, version, record, published FROM fastpatch_versions WHERE name=%s AND "
                            "version=%s", (name, version)).fetchone()
        return None if row is None else self._version_row(row)

    def list_versions(self, name) -> list:
        with self._read() as c:
            rows = c.execute("SELECT name, version, record, published, sort_key FROM fastpatch_versions "
                             "WHERE name=%s", (name,)).fetchall()
        rows.sort(key=lambda r: json.loads(r[4]))
        return [self._version_row(r) for r in rows]

    def update_version(self, name, version, mutate, *, actor, action, audit=None) -> dict:
        with self._write() as c:
            row = c.execute("SELECT name, version, record, published FROM fastpatch_versions WHERE name=%s AND "
                            "version=%s", (name, version)).fetchone()
            if row is None:
                raise Conflict(f"{name!r} has no version {version!r}")
            new = mutate(json.loads(row[2]))
            c.execute("UPDATE fastpatch_versions SET record=%s WHERE name=%s AND version=%s",
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
        q = "SELECT id, ts, actor, action, name, fields FROM fastpatch_audit WHERE id > %s"
        args: list = [int(since)]
        if name is not None:
            q += " AND name = %s"
            args.append(name)
        q += " ORDER BY id"
        if limit is not None:
            q += " LIMIT %s"
            args.append(int(limit))
        out = []
        with self._read() as c:
            for i, ts, actor, action, nm, fields in c.execute(q, args):
                entry = {"id": int(i), "ts": ts, "actor": actor, "action": action, "name": nm}
                entry.update(json.loads(fields))
                out.append(entry)
        return out

    def add_telemetry(self, rows) -> None:
        """Add counters: rows of (name, version, arm, metric, n, total, total_sq). Not a change of state: no
        generation bump, no audit entry. Rows go in key order, so concurrent writers cannot deadlock."""
        merged: dict = {}
        for name, version, arm, metric, n, total, total_sq in rows:
            k = (name, version, arm, metric)
            a = merged.get(k, (0, 0.0, 0.0))
            merged[k] = (a[0] + int(n), a[1] + float(total), a[2] + float(total_sq))
        if not merged:
            return
        with self._errors("writing telemetry"), self._use() as c, c.transaction(), c.cursor() as cur:
            cur.executemany(
                "INSERT INTO fastpatch_telemetry(name, version, arm, metric, n, total, total_sq) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name, version, arm, metric) DO UPDATE SET "
                "n = fastpatch_telemetry.n + excluded.n, total = fastpatch_telemetry.total + excluded.total, "
                "total_sq = fastpatch_telemetry.total_sq + excluded.total_sq",
                [(*k, *v) for k, v in sorted(merged.items())])

    def telemetry(self) -> list:
        with self._read() as c:
            return [dict(zip(("name", "version", "arm", "metric", "n", "total", "total_sq"), r))
                    for r in c.execute("SELECT name, version, arm, metric, n, total, total_sq FROM "
                                       "fastpatch_telemetry ORDER BY name, version, arm, metric")]

    def add_alert(self, alert) -> dict:
        with self._write() as c:
            i = c.execute("INSERT INTO fastpatch_alerts(id, ts, name, body) SELECT coalesce(max(id), 0) + 1, "
                          "%s, %s, %s FROM fastpatch_alerts RETURNING id",
                          (alert.get("ts", _now()), alert["name"], json.dumps(alert, allow_nan=False))).fetchone()[0]
            self._audit(c, alert.get("actor", "monitor"), "alert", alert["name"],
                        {k: v for k, v in alert.items() if k not in ("name", "actor")})
            return dict(alert, id=int(i))

    def alerts(self, *, name=None) -> list:
        q, args = "SELECT id, body FROM fastpatch_alerts", []
        if name is not None:
            q, args = q + " WHERE name=%s", [name]
        with self._read() as c:
            return [dict(json.loads(b), id=int(i)) for i, b in c.execute(q + " ORDER BY id", args)]

    # -- change detection -----------------------------------------------------------------------
    def generation(self) -> int:
        with self._read() as c:
            return int(c.execute("SELECT value FROM fastpatch_meta WHERE key='generation'").fetchone()[0])

    def wait_for_change(self, after: int, timeout_s: float) -> int:
        """Block until the generation exceeds ``after`` (LISTEN/NOTIFY: woken by the committing writer, in
        this process or on another machine) or ``timeout_s`` passed; returns the generation then."""
        deadline = time.monotonic() + float(timeout_s)
        with self._listen_lock:  # one listening connection per store; waiters take turns on it
            conn = self._listener
            if conn is None or conn.closed or conn.broken:
                conn = self._connect()
                with self._errors("listening"):
                    conn.execute(f"LISTEN {CHANNEL}")
                self._listener = conn
            while True:
                with self._errors("listening"):
                    # Read after LISTEN is active: a change committed before it is seen here, any later
                    # one arrives as a notification.
                    gen = int(conn.execute("SELECT value FROM fastpatch_meta WHERE key='generation'").fetchone()[0])
                    left = deadline - time.monotonic()
                    if gen > after or left <= 0:
                        return gen
                    for _ in conn.notifies(timeout=left, stop_after=1):
                        pass

    def snapshot(self) -> dict:
        with self._errors("reading a snapshot"), self._use() as c, c.transaction():
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")  # one view for all reads
            gen = int(c.execute("SELECT value FROM fastpatch_meta WHERE key='generation'").fetchone()[0])
            sets = {}
            for name, created, policy, rollout in c.execute("SELECT name, created, policy, rollout FROM "
                                                            "fastpatch_sets"):
                sets[name] = {"name": name, "created": created, "policy": json.loads(policy),
                              "rollout": json.loads(rollout), "versions": {}}
            for row in c.execute("SELECT name, version, record, published FROM fastpatch_versions"):
                sets[row[0]]["versions"][row[1]] = self._version_row(row)
        return {"generation": gen, "sets": sets}

    def integrity(self) -> list:
        """Problems found: versions whose blobs are missing or corrupted, a generation behind the audit log."""
        problems = []
        with self._read() as c:
            rows = c.execute("SELECT name, version, record FROM fastpatch_versions ORDER BY name, version").fetchall()
            top = c.execute("SELECT coalesce(max(id), 0) FROM fastpatch_audit").fetchone()[0]
        for name, version, rec in rows:
            for pname, digest in json.loads(rec).get("blobs", {}).items():
                try:
                    self.get_blob(digest)
                except StoreError as exc:
                    problems.append(f"{name}@{version} {pname}: {exc}")
        if top > self.generation():
            problems.append(f"audit id {top} is beyond the generation {self.generation()}")
        return problems

    def close(self) -> None:
        with self._pool_lock:
            conns, self._idle = self._idle, []
        with self._listen_lock:
            if self._listener is not None:
                conns.append(self._listener)
                self._listener = None
        for conn in conns:
            try:
                conn.close()
            except Exception:  # closing a broken connection: nothing left to release
                pass
