"""The registry store (SQLite WAL + content-addressed patch files): reopening restores everything, kill -9 of a
writer at random points never leaves a half change or loses an acknowledged one, two processes share a store,
a reader sees another process's changes by polling the generation.

The writer processes load fastpatch/lifecycle/store.py by file path (it is standard library only), so each
start costs milliseconds and many kills fit in a fast test."""
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

from fastpatch.lifecycle.store import Conflict, SQLiteStore, StoreError

STORE_PY = Path(__file__).resolve().parents[1] / "fastpatch" / "lifecycle" / "store.py"

# A writer: publishes versions (each with two fresh random blobs), makes each the stable one, adds
# telemetry; prints "ACK <kind> <version> <digests>" only after the call returned.
WRITER = r"""
import importlib.util, json, os, random, sys
spec = importlib.util.spec_from_file_location("store", sys.argv[1])
store_mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(store_mod)
st = store_mod.SQLiteStore(sys.argv[2])
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
    return subprocess.Popen([sys.executable, str(script), str(STORE_PY), str(root), set_name, str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reader(proc, lines):
    for line in proc.stdout:
        if line.endswith("\n"):  # a line cut short by the kill was never acknowledged
            lines.append(line.split(None, 3))


def _check_consistent(root, acked):
    """Everything acknowledged is there, nothing is half there, the audit log matches the changes."""
    st = SQLiteStore(root)
    try:
        assert st.integrity() == []  # SQLite integrity + every version's blobs present and hash-exact
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


def _crash_rounds(tmp_path, rounds, seed):
    root = tmp_path / "store"
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


def test_kill9_writer_at_random_points_leaves_store_consistent(tmp_path):
    acked = _crash_rounds(tmp_path, rounds=12, seed=1)
    assert sum(1 for a in acked if a[0] == "publish") >= 12  # the writers made progress between kills


@pytest.mark.slow
def test_kill9_writer_many_times(tmp_path):
    _crash_rounds(tmp_path, rounds=120, seed=2)


def test_two_processes_share_one_store(tmp_path):
    """Two writers publish into the same set at once; every acknowledged version is there exactly once."""
    root = tmp_path / "store"
    SQLiteStore(root).close()
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
    reader = SQLiteStore(root)
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


def test_reopen_restores_everything(tmp_path):
    root = tmp_path / "store"
    st = SQLiteStore(root)
    d1 = st.put_blob(b"patch file one")
    st.create_set("tone", {"regions": ["eu"]}, actor="alice")
    st.add_version("tone", "1.0.0", [1, 0, 0, 1, []], {"blobs": {"a": d1}, "patches": ["a"]}, actor="alice")
    st.update_set("tone", "rollout", lambda s: {"stable": "1.0.0", "arms": []}, actor="bob", action="activate")
    st.add_telemetry([("tone", "1.0.0", "control", "requests", 3, 3.0, 3.0)])
    st.add_alert({"name": "tone", "version": "1.0.0", "arm": "control", "metric": "m", "window_mean": 1.0,
                  "band": [0, 0.5]})
    before = (st.snapshot(), st.audit(), st.telemetry(), st.alerts(), st.generation())
    st.close()
    st2 = SQLiteStore(root)
    after = (st2.snapshot(), st2.audit(), st2.telemetry(), st2.alerts(), st2.generation())
    assert after == before
    assert st2.get_blob(d1) == b"patch file one"
    assert st2._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [e["actor"] for e in st2.audit()] == ["alice", "alice", "bob", "monitor"]
    st2.close()


def test_conflicts_and_bad_blobs_change_nothing(tmp_path):
    st = SQLiteStore(tmp_path / "s")
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
    # A blob changed on disk is detected, not served.
    st.blob_path(d).write_bytes(b"y")
    with pytest.raises(StoreError, match="corrupted"):
        st.get_blob(d)
    assert st.generation() == gen and st.audit() == audit
    st.close()


def test_gc_removes_only_unreferenced_blobs(tmp_path):
    st = SQLiteStore(tmp_path / "s")
    used, orphan = st.put_blob(b"used"), st.put_blob(b"orphan (a crash between blob and commit)")
    st.create_set("t", {}, actor="a")
    st.add_version("t", "1.0.0", [1, 0, 0, 1, []], {"blobs": {"p": used}}, actor="a")
    assert st.gc_blobs() == [orphan]
    assert st.get_blob(used) == b"used"
    st.close()
