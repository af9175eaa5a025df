"""Governance and the `fastpatch registry` CLI on the PostgreSQL store (a real server from tests/pg_fixture.py;
skipped with the reason when PostgreSQL or psycopg is not installed): publish, canary, promote, abort,
rollback and the audit trail, served by a replica with its own connection and checked against an independent
hook oracle; read commands on a database without a registry create nothing."""
from __future__ import annotations

import pytest
import torch

from fastpatch.app.cli import main as cli
from fastpatch.lifecycle.governance import Governance
from fastpatch.lifecycle.serving import Serving
from fastpatch.lifecycle.stores import open_store

from governance_util import greedy_logits, hook_oracle, patches_of, steer_file
from models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _tables(url):
    import psycopg

    with psycopg.connect(url) as c:
        return [r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'fastpatch_%' "
                                        "ORDER BY tablename")]


def test_governance_flow_on_postgres(pg_url, model):
    admin = Governance(open_store(pg_url), actor="alice")
    replica = Governance(open_store(pg_url), actor="replica")  # another pool of connections, as another machine
    expected = {v: hook_oracle(model, patches_of(s)["p"]) for v, s in (("1.0.0", 1), ("1.1.0", 2), ("1.2.0", 3))}
    serving = Serving(replica, model, poll_interval=0)

    def served(key):
        with serving.request("tone", key=key) as s:
            got = greedy_logits(model)
        torch.testing.assert_close(got, expected[s.version], rtol=1e-4, atol=1e-4)  # exactly its own version
        return s

    admin.publish("tone", "1.0.0", patches_of(1))
    admin.activate("tone", "1.0.0")
    admin.publish("tone", "1.1.0", patches_of(2))
    admin.canary("tone", "1.1.0", 50)
    keys = [f"user-{i}" for i in range(40)]
    arms = {k: admin.resolve("tone", key=k) for k in keys}
    canary_key = next(k for k, c in arms.items() if c.arm == "canary")
    control_key = next(k for k, c in arms.items() if c.arm == "control")
    assert served(canary_key).version == "1.1.0" and served(control_key).version == "1.0.0"

    admin.promote("tone")
    assert {served(k).version for k in (canary_key, control_key)} == {"1.1.0"}
    admin.publish("tone", "1.2.0", patches_of(3))
    admin.canary("tone", "1.2.0", 100)
    assert served(control_key).version == "1.2.0"
    admin.abort("tone", reason="effect out of band")
    assert served(control_key).version == "1.1.0"
    admin.rollback("tone")
    s = served(canary_key)
    assert s.version == "1.0.0" and s.generation == admin.store.generation()
    serving.close()

    audit = replica.audit()
    assert [(e["actor"], e["action"], e.get("version")) for e in audit] == [
        ("alice", "create_set", None), ("alice", "publish", "1.0.0"), ("alice", "activate", "1.0.0"),
        ("alice", "publish", "1.1.0"), ("alice", "rollout", "1.1.0"), ("alice", "promote", None),
        ("alice", "publish", "1.2.0"), ("alice", "rollout", "1.2.0"), ("alice", "abort", None),
        ("alice", "rollback", None)]
    assert [e["id"] for e in audit] == list(range(1, 11)) and admin.store.generation() == 10
    assert audit[8]["reason"] == "effect out of band"
    assert admin.store.integrity() == []
    for st in (admin.store, replica.store):
        st.close()


def test_cli_on_postgres(pg_url, tmp_path, capsys):
    def run(*args):
        code = cli(["registry", "--store", pg_url, "--actor", "carol", *args])
        out, err = capsys.readouterr()
        return code, out + err

    # A read command on a database that holds no registry: exit 2 with the reason, nothing created.
    code, out = run("list")
    assert code == 2 and "holds no fastpatch registry" in out and "check the URL" in out, out
    assert _tables(pg_url) == []
    code, out = run("publish", "tone", "1.0.0", "--patch", f"p={steer_file(tmp_path, 1)}")
    assert code == 0 and "published tone@1.0.0" in out, out
    assert "fastpatch_blobs" in _tables(pg_url)
    assert run("publish", "tone", "1.1.0", "--patch", f"p={steer_file(tmp_path, 2)}")[0] == 0
    assert run("activate", "tone", "1.0.0") == (0, "stable=1.0.0 arms=[]\n")
    assert run("rollout", "tone", "1.1.0", "--percent", "10")[1] == "stable=1.0.0 arms=[canary=1.1.0:10%]\n"
    assert run("promote", "tone")[1].startswith("stable=1.1.0 arms=[]")
    code, out = run("list")
    assert code == 0 and "tone" in out and "1.1.0" in out, out
    code, out = run("publish", "tone", "1.0.0", "--patch", f"p={steer_file(tmp_path, 3)}")
    assert code == 2 and "already published" in out and "\n" == out[-1] and out.count("\n") == 1, out
    code, out = run("--json", "audit")
    assert code == 0 and [e["action"] for e in __import__("json").loads(out)] == [
        "create_set", "publish", "publish", "activate", "rollout", "promote"]


def test_cli_names_an_unreachable_server_and_hides_the_password(tmp_path, capsys):
    pytest.importorskip("psycopg", reason='the PostgreSQL store needs psycopg 3: pip install "psycopg[binary]"')
    url = f"postgresql://fleet:s3cret@/patches?host={tmp_path / 'no-server-here'}"
    code = cli(["registry", "--store", url, "list"])
    err = capsys.readouterr().err
    assert code == 2 and "check that the server runs" in err and "s3cret" not in err, err
    assert err.count("\n") == 1
