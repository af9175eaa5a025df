"""The registry store contract, run against both stores (SQLite WAL + content-addressed patch files, and
PostgreSQL with blobs in the database, on a real server from tests/pg_fixture.py): reopening restores everything,
kill -9 of a writer at random points never leaves a half change or loses an acknowledged one, two processes share
a store, a reader sees another process's changes by polling the generation or waiting for a change.

The writer processes import fastpatch/lifecycle/store.py (and pg_store.py) without fastpatch/__init__.py (they
need the standard library and psycopg only), so each start costs milliseconds and many kills fit in a fast
test."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastpatch.lifecycle.store import Conflict, StoreError, StoreNotFound
from fastpatch.lifecycle.stores import open_store

REPO = Path(__file__).resolve().parents[2]

# A writer: publishes versions (each with two fresh random blobs), makes each the stable one, adds
# telemetry; prints "ACK <kind> <version> <digests>" only after the call returned.
WRITER = r"""
import json, os, random, sys, types
for pkg in ("fastpatch", "fastpatch.lifecycle"):  # the packages without their __init__ (no torch import)
    mod = types.ModuleType(pkg); mod.__path__ = [os.path.join(sys.argv[1], *pkg.split("."))]; sys.modules[pkg] = mod
from fastpatch.lifecycle import store as store_mod
from fastpatch.lifecycle.stores import open_store
st = open_store(sys.argv[2])
set_name, seed = sys.argv[3], int(sys.argv[4])
rng = random.Random(seed)
try:
    st.create_set(set_name, {}, actor="writer")
except store_mod.Conflict:
    pass
print("READY", flush=True)
while True:
    have = st.list_versions(set_name)
    i = len(have) + 1
    version = f"{i}.0.0"
    blobs = {p: st.put_blob(os.urandom(rng.randint(1, 200_000))) for p in ("a", "b")}
    try:
        st.add_version(set_name, version, [i, 0, 0, 1, []], {"blobs": blobs, "patches": ["a", "b"]}, actor="writer")
    except store_mod.Conflict:
        continue  # another writer published this number first
    print("ACK publish", version, json.dumps(blobs), flush=True)
    st.update_set(set_name, "rollout", lambda s: dict(s, stable=version), actor="writer", action="activate",
                  audit={"version": version})
    print("ACK activate", version, flush=True)
    st.add_telemetry([(set_name, version, "control", "requests", 1, 1.0, 1.0)])
    print("ACK telemetry", version, flush=True)
"""


def _start_writer(tmp_path, root, set_name, seed):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(REPO), str(root), set_name, str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reader(proc, lines):
    for line in proc.stdout:
        if line.endswith("\n"):  # a line cut short by the kill was never acknowledged
            lines.append(line.split(None, 3))


def _check_consistent(root, acked):
    """Everything acknowledged is there, nothing is half there, the audit log matches the changes."""
    st = open_store(root)
    try:
        assert st.integrity() == []  # SQLite integrity (on SQLite) + every version's blobs present and hash-exact
        versions = {}
        for name in st.list_sets():
            for v in st.list_versions(name):
                versions[(name, v["version"])] = v
        for kind, name, version, extra in acked:
            if kind == "publish":
                rec = versions[(name, version)]  # KeyError = an acknowledged publish was lost
                assert rec["blobs"] == json.loads(extra)
        acked_activate = {(n, v) for k, n, v, _ in acked if k == "activate"}
        for name in st.list_sets():
            stable = st.get_set(name)["rollout"].get("stable")
            assert stable is None or (name, stable) in versions  # never points at a half version
            last = [v for (n, v) in acked_activate if n == name]
            if last:  # the newest acknowledged activation (or a later unacknowledged one) is in effect
                newest = max(last, key=lambda s: int(s.split(".")[0]))
                assert int(stable.split(".")[0]) >= int(newest.split(".")[0])
        audit = st.audit()
        # One audit entry per committed change, and the generation counts exactly those changes.
        assert [e["id"] for e in audit] == list(range(1, len(audit) + 1))
        assert st.generation() == len(audit)
        published = [(e["name"], e["version"]) for e in audit if e["action"] == "publish"]
        assert sorted(published) == sorted(versions)  # no version without its audit entry, nor the reverse
        return len(versions)
    finally:
        st.close()


def _crash_rounds(tmp_path, root, rounds, seed):
    rng = random.Random(seed)
    acked = []
    for r in range(rounds):
        proc = _start_writer(tmp_path, root, "s", seed * 1000 + r)
        lines = []
        t = threading.Thread(target=_reader, args=(proc, lines), daemon=True)
        t.start()
        # Wait for the writer's first acknowledged publish (progress, not a wall-clock budget: a loaded
        # machine starts Python slowly; 300 s only stops a hang), then kill it at a random later point.
        deadline = time.monotonic() + 300
        while (not any(x[:2] == ["ACK", "publish"] for x in lines) and time.monotonic() < deadline
               and proc.poll() is None):
            time.sleep(0.005)
        assert lines and lines[0][0] == "READY", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.25))  # a random point of some publish / activation / telemetry write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t.join(5)
        for parts in lines[1:]:
            if parts[0] == "ACK" and len(parts) >= 3:
                kind, version = parts[1], parts[2]
                acked.append((kind, "s", version, parts[3].strip() if len(parts) > 3 else ""))
        _check_consistent(root, acked)
    return acked


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """What --store takes: a directory (SQLiteStore) or a postgresql:// URL of a fresh database (PostgresStore)."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "store")


# Crash rounds per store in the default run (a few on PostgreSQL: each round starts a writer and a connection).
ROUNDS = {"sqlite": 12, "postgres": 6}


def _kind(url):
    return "postgres" if url.startswith("postgresql://") else "sqlite"


def test_kill9_writer_at_random_points_leaves_store_consistent(tmp_path, store_url):
    rounds = ROUNDS[_kind(store_url)]
    acked = _crash_rounds(tmp_path, store_url, rounds=rounds, seed=1)
    assert sum(1 for a in acked if a[0] == "publish") >= rounds  # the writers made progress between kills


@pytest.mark.slow
def test_kill9_writer_many_times(tmp_path, store_url):
    _crash_rounds(tmp_path, store_url, rounds=120, seed=2)


def test_two_processes_share_one_store(tmp_path, store_url):
    """Two writers publish into the same set at once; every acknowledged version is there exactly once."""
    root = store_url
    open_store(root).close()
    procs = [_start_writer(tmp_path, root, "shared", s) for s in (11, 12)]
    lines = [[], []]
    threads = [threading.Thread(target=_reader, args=(p, out), daemon=True) for p, out in zip(procs, lines)]
    for t in threads:
        t.start()
    # Progress conditions, not wall-clock budgets: the test goes on once both writers are up and each
    # has published a few versions, however loaded the machine is; the long bounds only stop a hang.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(out and out[0][0] == "READY" for out in lines):
        time.sleep(0.005)
    reader = open_store(root)
    seen_generations = [reader.generation()]

    def publishes():
        return [sum(1 for x in out if x[:2] == ["ACK", "publish"]) for out in lines]

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and min(publishes()) < 5:
        seen_generations.append(reader.generation())  # a third process-like reader polls while they write
        time.sleep(0.01)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    for t in threads:
        t.join(5)
    acked = [("publish" if x[1] == "publish" else x[1], "shared", x[2], x[3].strip() if len(x) > 3 else "")
             for out in lines for x in out if x[0] == "ACK"]
    by_writer = [sum(1 for x in out if x[:2] == ["ACK", "publish"]) for out in lines]
    assert min(by_writer) > 0, (by_writer, [p.stderr.read()[-2000:] for p in procs])  # both really wrote
    n = _check_consistent(root, acked)
    assert n >= sum(by_writer) >= 2
    assert seen_generations == sorted(seen_generations) and seen_generations[-1] > seen_generations[0]
    versions = [v["version"] for v in reader.list_versions("shared")]
    assert versions == [f"{i}.0.0" for i in range(1, len(versions) + 1)]  # no gap, no duplicate
    reader.close()


def test_reopen_restores_everything(store_url):
    root = store_url
    st = open_store(root)
    d1 = st.put_blob(b"patch file one")
    st.create_set("tone", {"regions": ["eu"]}, actor="alice")
    st.add_version("tone", "1.0.0", [1, 0, 0, 1, []], {"blobs": {"a": d1}, "patches": ["a"]}, actor="alice")
    st.update_set("tone", "rollout", lambda s: {"stable": "1.0.0", "arms": []}, actor="bob", action="activate")
    st.add_telemetry([("tone", "1.0.0", "control", "requests", 3, 3.0, 3.0)])
    st.add_alert({"name": "tone", "version": "1.0.0", "arm": "control", "metric": "m", "window_mean": 1.0,
                  "band": [0, 0.5]})
    before = (st.snapshot(), st.audit(), st.telemetry(), st.alerts(), st.generation())
    st.close()
    st2 = open_store(root, create=False)
    after = (st2.snapshot(), st2.audit(), st2.telemetry(), st2.alerts(), st2.generation())
    assert after == before
    assert st2.get_blob(d1) == b"patch file one"
    if _kind(root) == "sqlite":
        assert st2._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [e["actor"] for e in st2.audit()] == ["alice", "alice", "bob", "monitor"]
    st2.close()


def _corrupt_blob(st, digest, data):
    """Change a stored blob's bytes behind the store's back (a disk or an operator's mistake)."""
    if hasattr(st, "blobs"):  # SQLiteStore: a file
        st.blob_path(digest).write_bytes(data)
    else:  # PostgresStore: a row
        with st._use() as c:
            c.execute("UPDATE fastpatch_blobs SET data=%s WHERE digest=%s", (data, digest))


def test_conflicts_and_bad_blobs_change_nothing(store_url):
    st = open_store(store_url)
    d = st.put_blob(b"x")
    st.create_set("tone", {}, actor="a")
    st.add_version("tone", "1.0.0", [1, 0, 0, 1, []], {"blobs": {"a": d}}, actor="a")
    gen, audit = st.generation(), st.audit()
    with pytest.raises(Conflict, match="already published"):
        st.add_version("tone", "1.0.0", [1, 0, 0, 1, []], {"blobs": {"a": d}}, actor="a")
    with pytest.raises(Conflict, match="not newer"):
        st.add_version("tone", "0.9.0", [0, 9, 0, 1, []], {"blobs": {"a": d}}, actor="a")
    with pytest.raises(Conflict, match="no patch set"):
        st.add_version("nope", "1.0.0", [1, 0, 0, 1, []], {"blobs": {"a": d}}, actor="a")
    with pytest.raises(StoreError, match="not stored first"):
        st.add_version("tone", "2.0.0", [2, 0, 0, 1, []], {"blobs": {"a": "0" * 64}}, actor="a")
    for bad in ("../../etc/passwd", "ab", "g" * 64):
        with pytest.raises(StoreError, match="sha256"):
            st.blob_path(bad)
        with pytest.raises(StoreError, match="sha256"):
            st.get_blob(bad)
    with pytest.raises(StoreError, match="missing"):
        st.get_blob("0" * 64)
    # A blob changed in storage is detected, not served; storing the right bytes again repairs it.
    _corrupt_blob(st, d, b"y")
    with pytest.raises(StoreError, match="corrupted"):
        st.get_blob(d)
    assert [p.split(":")[0] for p in st.integrity()] == ["tone@1.0.0 a"]
    assert st.put_blob(b"x") == d and st.get_blob(d) == b"x" and st.integrity() == []
    assert st.generation() == gen and st.audit() == audit
    st.close()


def test_gc_removes_only_unreferenced_blobs(store_url):
    st = open_store(store_url)
    used, orphan = st.put_blob(b"used"), st.put_blob(b"orphan (a crash between blob and commit)")
    st.create_set("t", {}, actor="a")
    st.add_version("t", "1.0.0", [1, 0, 0, 1, []], {"blobs": {"p": used}}, actor="a")
    assert st.gc_blobs() == [orphan]
    assert st.get_blob(used) == b"used"
    st.close()


def test_a_replica_waiting_for_a_change_wakes_on_another_process_commit(tmp_path, store_url):
    """A replica blocked in wait_for_change (PostgreSQL: LISTEN/NOTIFY; SQLite: polling) returns once a writer
    process commits; the long bound only stops a hang."""
    replica = open_store(store_url)
    start = replica.generation()
    got = []
    waiter = threading.Thread(target=lambda: got.append(replica.wait_for_change(start, 300)), daemon=True)
    waiter.start()
    proc = _start_writer(tmp_path, store_url, "w", 5)
    waiter.join(300)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert got and got[0] > start, proc.stderr.read()[-2000:]
    snap = replica.snapshot()  # what the replica reloads: consistent with the generation it reports
    assert snap["generation"] >= got[0] and "w" in snap["sets"]
    assert replica.wait_for_change(replica.generation(), 0) == replica.generation()  # no change: returns at once
    replica.close()


def test_read_only_open_of_a_missing_store_creates_nothing(tmp_path, store_url):
    with pytest.raises(StoreNotFound, match="check the"):
        open_store(store_url, create=False)
    if _kind(store_url) == "sqlite":
        assert not Path(store_url).exists()
    else:
        import psycopg

        with psycopg.connect(store_url) as c:
            assert c.execute("SELECT to_regclass('fastpatch_meta')").fetchone()[0] is None
    open_store(store_url).close()  # create=True makes it; now a read-only open works
    assert open_store(store_url, create=False).generation() == 0


def test_unknown_store_url_scheme_is_refused(tmp_path):
    with pytest.raises(StoreError, match="postgresql://"):
        open_store("mysql://u@h/db")
    assert not Path("mysql:").exists()


def test_postgres_server_crash_loses_no_acknowledged_change(tmp_path, pg_server, pg_url):
    """The database server itself dies (pg_ctl stop -m immediate: no shutdown checkpoint, WAL recovery on
    start) while a writer works: after the restart every acknowledged change is there, nothing half."""
    proc = _start_writer(tmp_path, pg_url, "s", 7)
    lines = []
    t = threading.Thread(target=_reader, args=(proc, lines), daemon=True)
    t.start()
    deadline = time.monotonic() + 300
    while (sum(1 for x in lines if x[:2] == ["ACK", "publish"]) < 3 and time.monotonic() < deadline
           and proc.poll() is None):
        time.sleep(0.005)
    pg_server.stop("immediate")
    try:
        proc.wait(300)  # the writer fails on the lost connection
    finally:
        pg_server.start()
    t.join(5)
    acked = [(x[1], "s", x[2], x[3].strip() if len(x) > 3 else "") for x in lines if x[0] == "ACK"]
    assert sum(1 for a in acked if a[0] == "publish") >= 3, proc.stderr.read()[-2000:]
    assert _check_consistent(pg_url, acked) >= 3


def test_postgres_threads_share_a_few_connections(pg_url):
    """A thread per HTTP connection (the admin server) must not mean a database connection per thread: calls
    borrow from a pool of idle connections, and what a finished thread used goes back to it."""
    import psycopg

    st = open_store(pg_url)
    st.create_set("t", {}, actor="a")
    errors = []

    def one_call():
        try:
            assert st.get_set("t")["name"] == "t" and st.generation() == 1
        except BaseException as exc:  # reported below: an assert in a thread would be lost
            errors.append(exc)

    for _ in range(5):  # 5 waves of 20 short-lived threads
        threads = [threading.Thread(target=one_call) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert not errors, errors
    with psycopg.connect(pg_url) as c:
        n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
                      "application_name = 'fastpatch-registry'").fetchone()[0]
    assert 1 <= n <= 8, n  # the pool's idle connections (max_idle_connections=8), not 100
    st.close()
