"""The black-box findings of issue #19, each checked from outside: raw sockets and real HTTP over loopback
against the admin server, `fastpatch registry` as a subprocess, and the Python API.

- a truncated request body is a 400 and changes nothing; a body that never arrives is a 408 after the
  server's read timeout (the server thread is freed and the server keeps answering);
- a guard set after traffic began fires (the detector reads the set's bands from the current snapshot, and
  a given band wins over one learnt from a first window);
- `fastpatch registry` mistakes are one line with exit 2 (FASTPATCH_TRACEBACK=1: a traceback); read
  commands never create a store; `serve --port 0` prints the bound port; a closed stdout ends quietly;
- `fastpatch_active_version`'s HELP says what its value is (the percent of keys);
- a corrupted blob does not stop `Serving`: the other sets are served, an alert names the broken version,
  its requests are refused (503 over HTTP), never served unpatched.
"""
from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

import fastpatch
from fastpatch.app.admin_server import AdminServer
from fastpatch.lifecycle.governance import Choice, Governance
from fastpatch.lifecycle.serving import Serving, Unavailable
from fastpatch.lifecycle.store import SQLiteStore, StoreNotFound
from fastpatch.lifecycle.telemetry import Detector, prometheus

from models import tiny_model

ADMIN = "admin-secret-0123456789"
SITE = "layers.0.resid_post"
WAIT = 120  # generous bound for anything that should happen at once


def _patches(seed, scale=1.0):
    v = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 4
    return {"p": {SITE: fastpatch.Steer(v, scale)}}


def _file(tmp_path, seed):
    return fastpatch.save(_patches(seed)["p"], tmp_path / f"p-{seed}.safetensors", name="p")


# -- HTTP: truncated and missing bodies ------------------------------------------------------------------
@pytest.fixture
def canary_server(tmp_path):
    """An admin server (no model) over a store with tone@1.0.0 stable and a 10% canary of 1.1.0."""
    gov = Governance(SQLiteStore(tmp_path / "store"), actor="setup")
    gov.publish("tone", "1.0.0", _patches(1))
    gov.publish("tone", "1.1.0", _patches(2))
    gov.activate("tone", "1.0.0")
    gov.canary("tone", "1.1.0", 10)
    srv = AdminServer(gov, {ADMIN: {"actor": "alice", "role": "admin"}}, read_timeout=0.5)
    host, port = srv.start()
    yield gov, host, port
    srv.stop()
    gov.store.close()


def _raw_request(host, port, path, body: bytes, content_length: int, *, close_write: bool) -> bytes:
    """One POST over a raw socket; returns every byte the server sent before closing the connection."""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=WAIT) as s:
        s.sendall(head + body)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while True:  # the server closes the connection after an error response (or after Connection: close)
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def _status_and_json(response: bytes):
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body), head.decode("latin-1")


def test_complete_raw_body_is_executed(canary_server):
    """The harness itself: a whole body over the same raw socket is executed (200, aborted, audited)."""
    gov, host, port = canary_server
    body = b'{"reason": "raw"}'
    status, out, _ = _status_and_json(_raw_request(host, port, "/v1/sets/tone/abort", body, len(body),
                                                   close_write=True))
    assert status == 200 and out["arms"] == []
    assert gov.audit("tone")[-1]["action"] == "abort" and gov.audit("tone")[-1]["actor"] == "alice"


def test_truncated_body_is_refused_and_changes_nothing(canary_server):
    gov, host, port = canary_server
    before = (gov.store.snapshot(), gov.audit())
    status, out, head = _status_and_json(_raw_request(host, port, "/v1/sets/tone/abort", b"{}", 1000,
                                                      close_write=True))
    assert status == 400, out
    assert "truncated body: 2 of the 1000 bytes" in out["error"] and "nothing was done" in out["error"]
    assert "Connection: close" in head
    assert (gov.store.snapshot(), gov.audit()) == before  # not aborted, not audited
    assert gov.show("tone")["rollout"]["arms"][0]["version"] == "1.1.0"


def test_body_that_never_arrives_times_out(canary_server):
    """Content-Length 1000, 2 bytes sent, the write side left open: the server gives up after its read
    timeout (0.5 s here) with a 408 and closes the connection; nothing is done, the server keeps serving."""
    gov, host, port = canary_server
    before = (gov.store.snapshot(), gov.audit())
    status, out, head = _status_and_json(_raw_request(host, port, "/v1/sets/tone/abort", b"{}", 1000,
                                                      close_write=False))
    assert status == 408, out
    assert "2 of the 1000 bytes" in out["error"] and "within 0.5 s" in out["error"]
    assert (gov.store.snapshot(), gov.audit()) == before
    req = urllib.request.Request(f"http://{host}:{port}/v1/sets/tone", headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        assert r.status == 200 and json.loads(r.read())["rollout"]["arms"][0]["weight"] == 10


def test_bad_content_length_and_chunked_bodies_are_refused(canary_server):
    gov, host, port = canary_server
    before = gov.audit()
    status, out, _ = _status_and_json(_raw_request(host, port, "/v1/sets/tone/abort", b"{}", -5, close_write=True))
    assert status == 400 and "Content-Length" in out["error"]
    head = (f"POST /v1/sets/tone/abort HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=WAIT) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status, out, _ = _status_and_json(data)
    assert status == 411 and "Content-Length" in out["error"]
    assert gov.audit() == before


def test_read_timeout_must_be_positive(tmp_path):
    gov = Governance(SQLiteStore(tmp_path / "s"), actor="x")
    for bad in (0, -1, float("inf"), "10"):
        with pytest.raises(ValueError, match="read_timeout"):
            AdminServer(gov, {ADMIN: {"actor": "a", "role": "admin"}}, read_timeout=bad)
    gov.store.close()


# -- a guard set after traffic began ---------------------------------------------------------------------
def _guarded(tmp_path, *, stable_traffic_first: int, canary_traffic_first: int = 0):
    gov = Governance(SQLiteStore(tmp_path / "store"), actor="alice")
    gov.publish("t", "1.0.0", _patches(1))
    gov.publish("t", "1.1.0", _patches(2))
    gov.activate("t", "1.0.0")
    gov.canary("t", "1.1.0", 10)
    for _ in range(stable_traffic_first):
        assert gov.observe(Choice("t", "1.0.0", "control", "p"), "effect", 0.5) is None
    for i in range(canary_traffic_first):  # a first window: the detector learns a band around 50
        assert gov.observe(Choice("t", "1.1.0", "canary", "p"), "effect", 50.0 + (i % 2)) is None
    gov.set_guard("t", "pause", bands={"effect": [0, 1]})
    alerts = [a for a in (gov.observe(Choice("t", "1.1.0", "canary", "p"), "effect", 50.0) for _ in range(60)) if a]
    return gov, alerts


@pytest.mark.parametrize("stable_first", [0, 1, 5])
def test_guard_fires_whether_or_not_traffic_came_first(tmp_path, stable_first):
    gov, alerts = _guarded(tmp_path, stable_traffic_first=stable_first)
    assert len(alerts) == 3  # 60 observations, windows of 20, each mean 50 outside [0, 1]
    assert all(a["band"] == [0.0, 1.0] and a["arm"] == "canary" and a["guard"] == "pause" for a in alerts)
    assert gov.show("t")["rollout"]["paused"]
    pauses = [e for e in gov.audit("t") if e["action"] == "pause"]
    assert len(pauses) == 1 and pauses[0]["actor"] == "guard"
    gov.store.close()


def test_given_band_wins_over_a_band_learnt_before_it(tmp_path):
    """A first canary window (mean ~50.5) taught the detector a band around 50; the operator's band [0, 1]
    given afterwards is the one checked."""
    gov, alerts = _guarded(tmp_path, stable_traffic_first=1, canary_traffic_first=20)
    assert len(alerts) == 3 and alerts[0]["band_source"] == "validation" and alerts[0]["band"] == [0.0, 1.0]
    assert gov.show("t")["rollout"]["paused"]
    gov.store.close()


def test_band_set_by_another_process_applies_and_removed_band_stops(tmp_path):
    """Bands live in the store: a guard set through another Governance (another replica) applies to this
    one's next window, and removing it there stops it here (the learnt band takes over again)."""
    gov = Governance(SQLiteStore(tmp_path / "store"), actor="replica", detector=Detector(window=2))
    gov.publish("t", "1.0.0", _patches(1))
    gov.activate("t", "1.0.0")
    c = Choice("t", "1.0.0", "control", "p")
    assert [gov.observe(c, "m", v) for v in (0.5, 0.5)] == [None, None]  # learns [0.5, 0.5] ± min width
    other = Governance(SQLiteStore(tmp_path / "store"), actor="operator")
    other.set_guard("t", None, bands={"m": [10, 20]})
    assert gov.observe(c, "m", 0.5) is None
    alert = gov.observe(c, "m", 0.5)
    assert alert is not None and alert["band"] == [10.0, 20.0]
    other.set_guard("t", None, bands={})
    assert [gov.observe(c, "m", 0.5) for _ in range(2)] == [None, None]  # back on the learnt band: in it
    assert gov.detector.band("t", "control", "m")[2] == "first window"
    other.store.close()
    gov.store.close()


# -- fastpatch registry as a subprocess ------------------------------------------------------------------
def _cli(*args, env=None, timeout=WAIT):
    e = dict(os.environ)
    e.pop("FASTPATCH_TRACEBACK", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastpatch", "registry", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout)


@pytest.fixture
def cli_store(tmp_path):
    store = tmp_path / "store"
    f1 = _file(tmp_path, 1)
    gov = Governance(SQLiteStore(store), actor="setup")
    gov.publish("tone", "1.0.0", {"p": f1})
    gov.activate("tone", "1.0.0")
    gov.store.close()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a patch file at all" * 4)
    return store, f1, junk


CLI_MISTAKES = [
    ("duplicate version", lambda f1, junk, d: ["publish", "tone", "1.0.0", "--patch", f"p={f1}"], "already published"),
    ("missing patch file", lambda f1, junk, d: ["publish", "tone", "2.0.0", "--patch", f"p={d / 'nope.safetensors'}"],
     "nope.safetensors"),
    ("junk patch file", lambda f1, junk, d: ["publish", "tone", "2.0.0", "--patch", f"p={junk}"], "junk.safetensors"),
    ("percent over 100", lambda f1, junk, d: ["rollout", "tone", "1.0.0", "--percent", "150"], "between 0 and 100"),
    ("unknown set", lambda f1, junk, d: ["show", "nope"], "no patch set named 'nope'"),
    ("unknown version", lambda f1, junk, d: ["activate", "tone", "9.9.9"], "no version '9.9.9'"),
]


@pytest.mark.parametrize("case", CLI_MISTAKES, ids=[c[0] for c in CLI_MISTAKES])
def test_cli_mistakes_are_one_line_exit_2_and_traceback_on_request(cli_store, tmp_path, case):
    store, f1, junk = cli_store
    _, argv, message = case
    argv = ["--store", store, *argv(f1, junk, tmp_path)]
    audit_before = Governance(SQLiteStore(store, create=False), actor="t").audit()
    r = _cli(*argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastpatch registry: error: ") and message in lines[0], r.stderr
    assert r.stdout == ""
    r = _cli(*argv, env={"FASTPATCH_TRACEBACK": "1"})
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr and message in r.stderr
    assert Governance(SQLiteStore(store, create=False), actor="t").audit() == audit_before  # nothing changed


@pytest.mark.parametrize("argv", [["list"], ["show", "tone"], ["audit"], ["alerts"], ["metrics"],
                                  ["activate", "tone", "1.0.0"], ["serve", "--tokens", "t.json", "--port", "0"]])
def test_cli_commands_other_than_publish_never_create_a_store(tmp_path, argv):
    missing = tmp_path / "no" / "such" / "dir"
    r = _cli("--store", missing, *argv)
    assert r.returncode == 2 and "does not exist" in r.stderr and str(missing) in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "(no patch sets)" not in r.stdout
    assert not (tmp_path / "no").exists()
    if argv != ["list"]:
        return  # an existing directory without a store: checked once
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("--store", empty, *argv)
    assert r.returncode == 2 and "holds no registry store" in r.stderr, r.stderr
    assert list(empty.iterdir()) == []


def test_cli_publish_creates_the_store_and_help_says_so(tmp_path):
    store = tmp_path / "new" / "store"
    r = _cli("--store", store, "publish", "tone", "1.0.0", "--patch", f"p={_file(tmp_path, 1)}")
    assert r.returncode == 0 and "published tone@1.0.0" in r.stdout, r.stderr
    assert (store / "registry.db").is_file()
    r = _cli("--store", store, "list")
    assert r.returncode == 0 and r.stdout.startswith("tone")
    r = _cli("--help")
    assert r.returncode == 0 and "Only publish and policy create the store" in r.stdout


def test_cli_serve_port_0_prints_the_bound_port(cli_store, tmp_path):
    store, _, _ = cli_store
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {ADMIN: {"actor": "alice", "role": "admin"}}}))
    env = dict(os.environ)
    env.pop("FASTPATCH_TRACEBACK", None)
    proc = subprocess.Popen([sys.executable, "-m", "fastpatch", "registry", "--store", str(store), "serve",
                             "--tokens", str(tokens), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=WAIT)
        m = re.match(r"admin API on http://127\.0\.0\.1:(\d+)/v1 ", line)
        assert m, line
        port = int(m.group(1))
        assert port != 0
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/sets", headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            assert json.loads(r.read()) == {"sets": ["tone"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("argv", [["--json", "audit"], ["audit"], ["metrics"]])
def test_cli_closed_stdout_ends_quietly(cli_store, argv):
    """The reader closes the pipe before the command writes (its end is closed before the child has even
    imported fastpatch): no BrokenPipe message, exit 0."""
    store, _, _ = cli_store
    env = dict(os.environ)
    env.pop("FASTPATCH_TRACEBACK", None)
    proc = subprocess.Popen([sys.executable, "-m", "fastpatch", "registry", "--store", str(store), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=WAIT) == 0 and err == "", err


# -- Prometheus: fastpatch_active_version ----------------------------------------------------------------
def test_active_version_help_and_value_agree(tmp_path):
    gov = Governance(SQLiteStore(tmp_path / "store"), actor="alice")
    gov.publish("tone", "1.0.0", _patches(1))
    gov.publish("tone", "1.1.0", _patches(2))
    gov.activate("tone", "1.0.0")
    gov.canary("tone", "1.1.0", 10)
    serving = Serving(gov, tiny_model("llama"), poll_interval=0)
    text = prometheus([], active=serving.active())
    assert "# HELP fastpatch_active_version Percent of request keys (0-100)" in text
    assert 'fastpatch_active_version{set="tone",version="1.0.0",arm="control"} 90' in text
    assert 'fastpatch_active_version{set="tone",version="1.1.0",arm="canary"} 10' in text
    gov.pause("tone")
    serving.refresh(force=True)
    text = prometheus([], active=serving.active())
    assert 'fastpatch_active_version{set="tone",version="1.0.0",arm="control"} 100' in text
    assert "canary" not in text  # a paused canary serves nobody
    serving.close()
    gov.store.close()


# -- a corrupted blob ------------------------------------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_corrupted_blob_serves_the_others_alerts_and_refuses_the_broken_set(tmp_path):
    model = tiny_model("llama")
    ids = torch.tensor([[1, 5, 9, 13]])
    unpatched = _logits(model, ids)
    gov = Governance(SQLiteStore(tmp_path / "store"), actor="alice")
    for name, seed in (("good", 1), ("bad", 2)):
        gov.publish(name, "1.0.0", _patches(seed))
        gov.activate(name, "1.0.0")
    with fastpatch.patched(model, _patches(1)["p"]):
        expected_good = _logits(model, ids)
    digest = gov.store.get_version("bad", "1.0.0")["blobs"]["p"]
    path = gov.store.blob_path(digest)
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"\x00" * 8)  # same size, other content: the hash check fails

    reader = Governance(SQLiteStore(tmp_path / "store"), actor="server")  # a fresh process's view
    serving = Serving(reader, model, poll_interval=0)  # starts: the good set is served
    assert set(serving.unavailable()) == {("bad", "1.0.0")}
    with serving.request("good", key="u") as s:
        got = _logits(model, ids)
    assert s.version == "1.0.0"
    torch.testing.assert_close(got, expected_good, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, unpatched)
    with pytest.raises(Unavailable, match=r"bad@1\.0\.0 .*corrupted.*refused"):
        with serving.request("bad", key="u"):
            pytest.fail("a request for the broken set must not run")
    alerts = reader.alerts("bad")
    assert len(alerts) == 1 and alerts[0]["kind"] == "unavailable" and alerts[0]["version"] == "1.0.0"
    assert "corrupted" in alerts[0]["error"] and "bad@1.0.0" in alerts[0]["error"]
    audited = [e for e in reader.audit("bad") if e["action"] == "alert"]
    assert len(audited) == 1 and audited[0]["actor"] == "serving"
    serving.refresh(force=True)  # refreshing again does not raise the same alert twice
    assert len(reader.alerts("bad")) == 1

    # Over HTTP: 503 with the reason; /metrics names the broken version; the good set is served.
    srv = AdminServer(reader, {ADMIN: {"actor": "bob", "role": "admin"}}, serving=serving)
    host, port = srv.start()
    try:
        def post(path, body):
            req = urllib.request.Request(f"http://{host}:{port}{path}", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {ADMIN}"})
            try:
                with urllib.request.urlopen(req, timeout=WAIT) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, out = post("/v1/generate", {"patch_set": "bad", "input_ids": [1, 5, 9], "max_new_tokens": 1})
        assert status == 503 and "bad@1.0.0" in out["error"] and "corrupted" in out["error"]
        status, out = post("/v1/generate", {"patch_set": "good", "input_ids": [1, 5, 9], "max_new_tokens": 1})
        assert status == 200 and out["served"]["version"] == "1.0.0"
        req = urllib.request.Request(f"http://{host}:{port}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            text = r.read().decode()
        assert 'fastpatch_version_unavailable{set="bad",version="1.0.0"} 1' in text
        assert "fastpatch_alerts_total 1" in text
    finally:
        srv.stop()

    # The CLI lists the alert in one line.
    r = _cli("--store", tmp_path / "store", "alerts")
    assert r.returncode == 0 and "bad@1.0.0" in r.stdout and "corrupted" in r.stdout, r.stderr

    # Restoring the blob brings the set back on the next refresh.
    path.write_bytes(original)
    serving.refresh()
    assert serving.unavailable() == {}
    with serving.request("bad", key="u") as s:
        got = _logits(model, ids)
    assert s.version == "1.0.0" and not torch.allclose(got, unpatched)
    serving.close()
    reader.store.close()
    gov.store.close()


def test_store_not_found_without_create(tmp_path):
    with pytest.raises(StoreNotFound, match="does not exist"):
        SQLiteStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
