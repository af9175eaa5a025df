"""Operating the registry: the HTTP admin API (tokens: 401 / 403 / audited actor, hostile bodies), the
`fastpatch registry` CLI, and a bounded load test over loopback (benchmarks/load_registry.py)."""
from __future__ import annotations

import base64
import importlib.util
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fastpatch.app.admin_server import AdminServer, load_tokens
from fastpatch.app.cli import main as cli
from fastpatch.lifecycle.governance import Governance
from fastpatch.lifecycle.serving import Serving
from fastpatch.lifecycle.store import SQLiteStore

from governance_util import steer_file
from models import tiny_model

ADMIN, READ = "admin-secret-0123456789", "read-secret-0123456789"


def _call(base, path, token=None, body=None, raw=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:  # a bound against hangs, not a speed check
            text = r.read().decode()
            return r.status, dict(r.headers), (json.loads(text) if "json" in r.headers["Content-Type"] else text)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


@pytest.fixture
def server(tmp_path):
    gov = Governance(SQLiteStore(tmp_path / "store"), actor="server")
    model = tiny_model("llama")
    serving = Serving(gov, model, poll_interval=0)
    srv = AdminServer(gov, {ADMIN: {"actor": "alice", "role": "admin"}, READ: {"actor": "bob", "role": "read"}},
                      serving=serving)
    host, port = srv.start()
    yield f"http://{host}:{port}", gov
    srv.stop()
    serving.close()
    gov.store.close()


def test_tokens_roles_and_audited_actor(server, tmp_path):
    base, gov = server
    b64 = base64.b64encode(steer_file(tmp_path, 1).read_bytes()).decode()
    publish = {"version": "1.0.0", "patches": {"p": b64}}
    assert _call(base, "/v1/sets")[0] == 401  # no token
    assert _call(base, "/v1/sets", token="wrong-token-0123456789")[0] == 401
    assert _call(base, "/v1/sets/tone/versions", body=publish)[0] == 401
    status, _, out = _call(base, "/v1/sets/tone/versions", READ, publish)
    assert status == 403 and "read-only" in out["error"]
    gen = gov.store.generation()
    assert gen == 0  # nothing happened
    status, _, out = _call(base, "/v1/sets/tone/versions", ADMIN, publish)
    assert status == 200 and out["version"] == "1.0.0"
    assert _call(base, "/v1/sets/tone/activate", ADMIN, {"version": "1.0.0"})[0] == 200
    for path in ("/v1/sets/tone/activate", "/v1/sets/tone/rollback", "/v1/sets/tone/expire", "/v1/report"):
        assert _call(base, path, READ, {"version": "1.0.0"})[0] == 403
    status, _, out = _call(base, "/v1/sets/tone", READ)
    assert status == 200 and [v["status"] for v in out["versions"]] == ["stable"]
    # Generation through the registry: the response says which version served it.
    status, headers, out = _call(base, "/v1/generate", READ, {"patch_set": "tone", "key": "u1",
                                                               "input_ids": [5, 17, 33], "max_new_tokens": 2})
    assert status == 200 and out["served"]["version"] == "1.0.0"
    assert headers["X-Fastpatch-Version"] == "tone@1.0.0 (control)"
    status, _, text = _call(base, "/metrics", READ)
    assert status == 200 and 'fastpatch_requests_total{set="tone",version="1.0.0",arm="control"} 1' in text
    audit = _call(base, "/v1/audit", READ)[2]["audit"]
    changes = [(e["actor"], e["action"]) for e in audit]
    assert changes == [("alice", "create_set"), ("alice", "publish"), ("alice", "activate")]


def test_hostile_requests_get_clear_errors(server, tmp_path):
    base, gov = server
    good = base64.b64encode(steer_file(tmp_path, 1).read_bytes()).decode()
    _call(base, "/v1/sets/tone/versions", ADMIN, {"version": "1.0.0", "patches": {"p": good}})
    before = gov.store.snapshot()
    cases = [
        ("/v1/sets/tone/versions", {"version": "1.0", "patches": {"p": good}}, 400, "semantic version"),
        ("/v1/sets/tone/versions", {"version": "1.0.0", "patches": {"p": good}}, 409, "already published"),
        ("/v1/sets/..%2F..%2Fetc/versions", {"version": "2.0.0", "patches": {"p": good}}, 400, "no '/' or '..'"),
        ("/v1/sets/tone/versions", {"version": "2.0.0", "patches": {"../p": good}}, 400, "patch name"),
        ("/v1/sets/tone/versions", {"version": "2.0.0", "patches": {"p": "%%%"}}, 400, "base64"),
        ("/v1/sets/tone/versions", {"version": "2.0.0", "patches": {"p": base64.b64encode(b"x" * 40).decode()}},
         400, "truncated|corrupted"),
        ("/v1/sets/tone/rollout", {"version": "9.9.9", "percent": 10}, 404, "no version"),
        ("/v1/sets/tone/rollout", {"version": "1.0.0", "percent": "ten"}, 400, "percentage"),
        ("/v1/sets/nope/activate", {"version": "1.0.0"}, 404, "no patch set"),
        ("/v1/generate", {"patch_set": "tone", "input_ids": [1], "labels": {"planet": "mars"}}, 400, "unknown label"),
        ("/v1/generate", {"patch_set": "tone", "input_ids": [10 ** 9]}, 400, "token ids"),
        ("/v1/nothing", {}, 404, "no route"),
    ]
    for path, body, status, msg in cases:
        got, _, out = _call(base, path, ADMIN, body)
        assert got == status and __import__("re").search(msg, out["error"]), (path, got, out)
    assert _call(base, "/v1/sets/tone/activate", ADMIN, raw=b"{not json")[0] == 400
    assert gov.store.snapshot() == before


def test_cli_end_to_end(tmp_path, capsys):
    store = str(tmp_path / "store")
    f1, f2 = steer_file(tmp_path, 1), steer_file(tmp_path, 2)

    def run(*args):
        code = cli(["registry", "--store", store, "--actor", "carol", *args])
        out, err = capsys.readouterr()
        return code, out + err

    assert run("policy", "tone", "--regions", "eu", "--sites", "layers.0.*")[0] == 0
    code, out = run("publish", "tone", "1.0.0", "--patch", f"p={f1}")
    assert code == 0 and "published tone@1.0.0" in out
    assert run("publish", "tone", "1.1.0", "--patch", f"p={f2}", "--note", "stronger")[0] == 0
    assert run("activate", "tone", "1.0.0") == (0, "stable=1.0.0 arms=[]\n")
    assert run("rollout", "tone", "1.1.0", "--percent", "10")[1] == "stable=1.0.0 arms=[canary=1.1.0:10%]\n"
    assert run("promote", "tone")[1].startswith("stable=1.1.0 arms=[]")
    assert run("rollback", "tone")[1].startswith("stable=1.0.0")
    assert run("rollout", "tone", "--arm", "b=1.1.0:20")[1] == "stable=1.0.0 arms=[b=1.1.0:20%]\n"
    assert run("abort", "tone")[0] == 0
    code, out = run("expire", "tone", "1.1.0", "--at", "2020-01-01T00:00:00Z")
    assert code == 0 and "2020-01-01T00:00:00+00:00" in out
    code, out = run("show", "tone")
    assert "1.1.0" in out and "expired" in out and '"regions": ["eu"]' in out
    code, out = run("list")
    assert out.startswith("tone") and "stable=1.0.0" in out
    code, out = run("audit")
    lines = out.strip().splitlines()
    assert len(lines) == 10 and all(" carol " in line for line in lines)
    assert run("alerts")[1] == "(no alerts)\n"
    code, out = run("publish", "tone", "bad", "--patch", f"p={f1}")
    assert code == 2 and "semantic version" in out
    code, out = run("publish", "../x", "2.0.0", "--patch", f"p={f1}")
    assert code == 2 and "no '/' or '..'" in out
    code, out = run("metrics")
    assert "fastpatch_registry_generation 10" in out
    assert len(run("audit")[1].strip().splitlines()) == 10  # the refused publishes changed nothing


def test_load_tokens_file(tmp_path):
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps({"tokens": {ADMIN: {"actor": "alice", "role": "admin"}}}))
    assert load_tokens(p)[ADMIN]["actor"] == "alice"
    p.write_text(json.dumps({"tokens": {"short": {"actor": "alice", "role": "admin"}}}))
    with pytest.raises(ValueError, match="16 characters"):
        load_tokens(p)


def _load_module():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "load_registry.py"
    spec = importlib.util.spec_from_file_location("load_registry", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_over_loopback_small():
    """3 clients across 3 patch sets while versions are published, rolled out, promoted, aborted and rolled
    back over the admin API: no failure, no mixed-version step, every served version agrees with the audit."""
    res = _load_module().run(clients=3, requests=4, new_tokens=2, max_seconds=120)
    assert res["failed"] == 0, res["failures"]
    assert res["mixed_version_steps"] == 0
    assert res["audit_mismatches"] == 0, res["audit_mismatch_examples"]
    assert res["header_mismatches"] == 0
    assert res["requests_ok"] >= 12 and res["admin_changes_during_run"] >= 30
    assert len(res["served_versions"]) >= 6  # several versions of several sets were really served
