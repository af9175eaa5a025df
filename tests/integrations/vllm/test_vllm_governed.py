"""Governed patch sets served by a real in-process vLLM engine (SmolLM2, eager, CPU) from a SQLite store.

Oracle: Hugging Face greedy decoding with the test's own patch file of the version the engine reports
(fastpatch.apply on the HF model, vllm_common.hf_greedy), and plain HF for "no patch"; the canary's sticky
split is recomputed here from its definition (sha256 of "set:key" into 10,000 buckets)."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

import fastpatch
from vllm_common import one_torch_thread  # noqa: F401 (autouse fixture)
from vllm_common import engine, hf_greedy, smollm2_folder, vllm_or_skip, write_files

N = 4  # tokens per request
SITES = ["layers.10.resid_post", "layers.6.resid_post"]
PROMPT = "The weather today is"


def in_canary(key: str, percent: float, name: str = "tone") -> bool:
    b = int.from_bytes(hashlib.sha256(f"{name}:{key}".encode()).digest()[:8], "big") % 10_000
    return b < round(percent * 100)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vllm_or_skip()
    from fastpatch.app.models import load_smollm2
    from fastpatch.lifecycle.governance import Governance
    from fastpatch.lifecycle.store import SQLiteStore

    hf, tok = load_smollm2()
    d = hf.config.hidden_size
    g = torch.Generator().manual_seed(6)
    files = write_files(tmp_path_factory.mktemp("files"), hf, {
        "1.0.0": {"layers.10.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 6)},
        "1.2.0": {"layers.6.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 6)},
        "1.1.0": {"layers.10.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 6)},
    })
    folder = str(tmp_path_factory.mktemp("store"))
    gov = Governance(SQLiteStore(folder), actor="alice")
    gov.create_set("tone", policy={"regions": ["eu", "us"]})
    gov.publish("tone", "1.0.0", {"calm": files["1.0.0"]})
    gov.activate("tone", "1.0.0")
    gov.publish("tone", "1.1.0", {"calm": files["1.1.0"]})
    gov.canary("tone", "1.1.0", 50)
    llm = engine(smollm2_folder(), {"store": folder, "patch_sets": ["tone"], "spare_slots": 4, "max_rank": 0,
                                    "sites": SITES, "poll_interval": 0},
                 worker_extension_cls="fastpatch.integrations.vllm.WorkerExtension")
    ids = tok(PROMPT).input_ids
    oracle = {v: hf_greedy(hf, ids, N, files[v])[0] for v in files}
    oracle[None] = hf_greedy(hf, ids, N)[0]
    assert len({tuple(t) for t in oracle.values()}) == 4  # every version visibly changes the output
    return dict(llm=llm, gov=gov, ids=ids, oracle=oracle, files=files, folder=folder)


def params(key=None, labels=None, name="tone", n=N):
    from vllm import SamplingParams

    section = {"set": name}
    if key is not None:
        section["key"] = key
    if labels is not None:
        section["labels"] = labels
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, extra_args={"fastpatch": section})


def run(s, keys, labels={"region": "eu"}):
    """[(report, tokens)] of one request per key, all in one batch."""
    from fastpatch.app.vllm_governed import served

    outs = s["llm"].generate([{"prompt_token_ids": s["ids"]}] * len(keys), [params(k, labels) for k in keys],
                             use_tqdm=False)
    return [(served(s["llm"], o.request_id), list(o.outputs[0].token_ids)) for o in outs]


def slots(s):
    return s["llm"].collective_rpc("fastpatch_slots")[0]


def test_canary_sticky_and_exact(setup):
    keys = [f"user-{i}" for i in range(16)]
    first = run(setup, keys)
    for key, (rep, toks) in zip(keys, first):
        want = ("1.1.0", "canary") if in_canary(key, 50) else ("1.0.0", "control")
        assert (rep["version"], rep["arm"]) == want, key
        assert toks == setup["oracle"][rep["version"]], key
    assert {r["version"] for r, _ in first} == {"1.0.0", "1.1.0"}
    again = run(setup, keys)
    assert [r["version"] for r, _ in again] == [r["version"] for r, _ in first]  # sticky
    assert sorted(slots(setup)) == ["tone@1.0.0/calm", "tone@1.1.0/calm"]


def test_unknown_set_and_bad_labels_are_refused(setup):
    with pytest.raises(Exception, match="unknown patch set 'nope'"):
        setup["llm"].generate([{"prompt_token_ids": setup["ids"]}], params("k", name="nope"), use_tqdm=False)
    with pytest.raises(Exception, match="unknown label"):
        setup["llm"].generate([{"prompt_token_ids": setup["ids"]}], params("k", labels={"planet": "mars"}),
                              use_tqdm=False)


def test_metrics_text_has_per_version_counters(setup):
    from prometheus_client import REGISTRY, generate_latest

    run(setup, ["m-1", "m-2"])
    text = generate_latest(REGISTRY).decode()
    assert 'fastpatch_requests_total{arm="control",set="tone",version="1.0.0"}' in text
    assert 'fastpatch_requests_total{arm="canary",set="tone",version="1.1.0"}' in text
    assert 'fastpatch_tokens_total{arm="canary",kind="output",set="tone",version="1.1.0"}' in text
    assert 'fastpatch_request_latency_seconds_count{arm="canary",set="tone",version="1.1.0"}' in text
    assert 'fastpatch_active_version{arm="canary",set="tone",version="1.1.0"} 50.0' in text
    # fire counts (read at the store poll): each version's ungated steer applied to every token row of its
    # requests, prompt + generated tokens but the last, at its one site; requests counted independently above
    from prometheus_client.parser import text_string_to_metric_families
    from fastpatch.app.vllm_governed import bridge_of

    bridge_of(setup["llm"]).refresh(force=True)
    samples = {(f.name, s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(REGISTRY).decode()) for s in f.samples}
    for version, arm in (("1.0.0", "control"), ("1.1.0", "canary")):
        labels = {"set": "tone", "version": version, "arm": arm}
        requests = samples[("fastpatch_requests", "fastpatch_requests_total", tuple(sorted(labels.items())))]
        fires = samples[("fastpatch_fires", "fastpatch_fires_total", tuple(sorted(
            {**labels, "patch": "calm", "site": "layers.10.resid_post"}.items())))]
        assert requests > 0 and fires == requests * (len(setup["ids"]) + N - 1)


def test_scope_promote_inflight_abort_expire(setup):
    from fastpatch.app.vllm_governed import bridge_of, served

    gov, llm = setup["gov"], setup["llm"]
    # Policy scope: a region outside the set's policy is served unpatched on purpose, and says so.
    (rep, toks), = run(setup, ["user-1"], labels={"region": "apac"})
    assert rep["version"] is None and "out of scope" in rep["reason"] and toks == setup["oracle"][None]

    gov.promote("tone", actor="bob")  # everyone gets 1.1.0; 1.0.0's slot is freed
    for rep, toks in run(setup, [f"user-{i}" for i in range(4)]):
        assert (rep["version"], rep["arm"]) == ("1.1.0", "control") and toks == setup["oracle"]["1.1.0"]
    assert sorted(slots(setup)) == ["tone@1.1.0/calm"]

    # In flight: request A starts on 1.1.0, 1.2.0 becomes stable, B gets 1.2.0, A ends on 1.1.0.
    eng = llm.llm_engine
    eng.add_request("inflight-A", {"prompt_token_ids": setup["ids"]}, params("user-1", {"region": "eu"}, n=N))
    outs = {}
    for o in eng.step():
        outs[o.request_id] = o
    gov.publish("tone", "1.2.0", {"calm": setup["files"]["1.2.0"]})
    gov.activate("tone", "1.2.0")
    eng.add_request("inflight-B", {"prompt_token_ids": setup["ids"]}, params("user-1", {"region": "eu"}, n=N))
    assert sorted(slots(setup)) == ["tone@1.1.0/calm", "tone@1.2.0/calm"]  # A still holds 1.1.0
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert served(llm, "inflight-A")["version"] == "1.1.0"
    assert served(llm, "inflight-B")["version"] == "1.2.0"
    assert list(outs["inflight-A"].outputs[0].token_ids) == setup["oracle"]["1.1.0"]
    assert list(outs["inflight-B"].outputs[0].token_ids) == setup["oracle"]["1.2.0"]
    bridge_of(llm).refresh(force=True)
    assert sorted(slots(setup)) == ["tone@1.2.0/calm"]  # nobody can get 1.1.0 any more: freed

    # A canary of 1.1.0 (re-activated), then abort: back to 1.2.0 for everyone.
    gov.canary("tone", "1.1.0", 100)
    assert all(r["version"] == "1.1.0" for r, _ in run(setup, ["a", "b"]))
    gov.abort("tone", actor="bob", reason="test")
    assert all(r["version"] == "1.2.0" and t == setup["oracle"]["1.2.0"] for r, t in run(setup, ["a", "b"]))

    # Expiry of the stable version: no patch for anyone, on purpose, reported; its slot is freed.
    gov.expire("tone", "1.2.0", actor="bob")
    for rep, toks in run(setup, ["a", "b"]):
        assert rep["version"] is None and "expired" in rep["reason"] and toks == setup["oracle"][None]
    assert slots(setup) == {}


def test_guard_pauses_canary_on_latency_anomaly_and_audit(setup):
    from fastpatch.app.vllm_governed import LATENCY, bridge_of

    gov = setup["gov"]
    gov.publish("tone", "1.3.0", {"calm": setup["files"]["1.0.0"]})
    gov.activate("tone", "1.3.0")
    gov.publish("tone", "1.4.0", {"calm": setup["files"]["1.1.0"]})
    gov.canary("tone", "1.4.0", 50)
    gov.set_guard("tone", "pause", bands={LATENCY: [0.0, 1e-9]}, actor="bob")  # any real latency is out of band
    keys = [f"g-{i}" for i in range(48)]
    canary_keys = [k for k in keys if in_canary(k, 50)]
    assert len(canary_keys) >= 20  # one detector window
    run(setup, canary_keys)
    bridge_of(setup["llm"]).refresh(force=True)  # the finished requests' latencies reach the detector
    alerts = gov.alerts("tone")
    assert alerts and alerts[-1]["arm"] == "canary" and alerts[-1]["guard"] == "pause"
    for rep, toks in run(setup, canary_keys[:2]):  # paused: canary keys get the stable version
        assert (rep["version"], rep["arm"]) == ("1.3.0", "control") and toks == setup["oracle"]["1.0.0"]
    bridge_of(setup["llm"]).flush()
    audit = gov.audit("tone")
    assert any(e["action"] == "pause" and e["actor"] == "guard" for e in audit)
    assert any(e["action"] == "promote" and e["actor"] == "bob" for e in audit)
    served = [e for e in audit if e["action"] == "served" and e["actor"] == "vllm"]
    assert sum(e["requests"] for e in served if e["version"] == "1.4.0") >= len(canary_keys)


def test_engine_refuses_to_start_without_a_bridge(setup, monkeypatch):
    from fastpatch.integrations.vllm import FastpatchStartError, frontend

    monkeypatch.setattr(frontend, "_BRIDGES", {})
    with pytest.raises(FastpatchStartError, match="no bridge that serves governed patch sets"):
        engine(smollm2_folder(), {"store": setup["folder"], "patch_sets": ["tone"], "spare_slots": 2,
                                  "sites": SITES}, worker_extension_cls="fastpatch.integrations.vllm.WorkerExtension")
    assert os.path.isdir(setup["folder"])


# -- the OpenAI server (`vllm serve`, multi-process engine) over loopback: vllm_xargs, the served header, and
# the governance admin routes (tokens, roles 401/403, audit) on the engine's own store ------------------------
ADMIN, READER = "admin-token-0123456789", "read-token-0123456789"


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    import json
    import subprocess
    import sys

    from test_vllm_server import START_TIMEOUT, _free_port, _post  # noqa: F401

    tmp = tmp_path_factory.mktemp("srv")
    folder = str(tmp / "store")
    from fastpatch.lifecycle.governance import Governance
    from fastpatch.lifecycle.store import SQLiteStore

    gov = Governance(SQLiteStore(folder), actor="alice")
    gov.publish("tone", "1.0.0", {"calm": setup["files"]["1.0.0"]})
    gov.activate("tone", "1.0.0")
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {ADMIN: {"actor": "carol", "role": "admin"},
                                             READER: {"actor": "dave", "role": "read"}}}))
    conf = {"store": folder, "patch_sets": ["tone"], "spare_slots": 3, "max_rank": 0, "sites": SITES,
            "poll_interval": 0.2}
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_PLUGINS="fastpatch,fastpatch_governed", FASTPATCH_TOKENS=str(tokens), OMP_NUM_THREADS="1")
    log = open(tmp / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", smollm2_folder(),
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
         "--max-model-len", "256", "--max-num-seqs", "8", "--served-model-name", "smol",
         "--additional-config", json.dumps({"fastpatch": conf}),
         "--worker-extension-cls", "fastpatch.integrations.vllm.WorkerExtension"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        import time
        import urllib.request

        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"vllm serve did not start within {START_TIMEOUT} s:\n{log.read()[-3000:]}")
            time.sleep(2)
        yield dict(base=base, proc=proc, gov=gov, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _complete(base, ids, section, stream=False):
    """(status, response JSON, headers); with ``stream``, the response is the text joined from the SSE chunks."""
    import json
    import urllib.request

    body = {"model": "smol", "prompt": ids, "max_tokens": N, "temperature": 0, "ignore_eos": True,
            "vllm_xargs": {"fastpatch": json.dumps(section)}, "stream": stream}  # vllm_xargs: JSON text, no dicts
    req = urllib.request.Request(base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            if stream:
                events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
                text = "".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]")
                return r.status, text, r.headers
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers


def _wait_for(cond, what, timeout=30):
    import time

    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.3)


def test_server_governed_requests_and_admin_routes(setup, server):
    import base64
    import json

    from test_vllm_server import _post

    base, ids = server["base"], setup["ids"]
    section = {"set": "tone", "key": "user-7", "labels": {"region": "eu"}}
    status, resp, headers = _complete(base, ids, section)
    assert status == 200, resp
    assert headers["X-Fastpatch-Served"] == "tone@1.0.0/calm (control)"
    status, resp, _ = _complete(base, ids, {"set": "nope"})
    assert status == 400 and "unknown patch set 'nope'" in json.dumps(resp)

    v1 = base + "/fastpatch/v1"
    blob = base64.b64encode(open(setup["files"]["1.1.0"], "rb").read()).decode()
    publish = {"version": "1.1.0", "patches": {"calm": blob}}
    assert _post(v1 + "/sets/tone/versions", publish)[0] == 401  # no token
    assert _post(v1 + "/sets/tone/versions", publish, headers={"Authorization": "Bearer wrong-token-xxxxxx"})[0] == 401
    assert _post(v1 + "/sets/tone/versions", publish, headers={"Authorization": f"Bearer {READER}"})[0] == 403
    status, listed = _post(v1 + "/sets", None, method="GET", headers={"Authorization": f"Bearer {READER}"})
    assert status == 200 and listed == {"sets": ["tone"]}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    status, rec = _post(v1 + "/sets/tone/versions", publish, headers=admin)
    assert status == 200 and rec["version"] == "1.1.0", rec
    status, resp = _post(v1 + "/sets/tone/activate", {"version": "1.1.0"}, headers=admin)
    assert status == 200, resp
    _wait_for(lambda: "1.1.0" in _complete(base, ids, section)[2].get("X-Fastpatch-Served", ""),
              "the server did not pick up the promotion")
    status, resp, headers = _complete(base, ids, section)
    assert headers["X-Fastpatch-Served"] == "tone@1.1.0/calm (control)"
    status, streamed, headers = _complete(base, ids, section, stream=True)  # headers sent before generation
    assert status == 200 and headers["X-Fastpatch-Served"] == "tone@1.1.0/calm (control)"
    assert streamed == resp["choices"][0]["text"]  # the streamed tokens are the same version's
    status, audit = _post(v1 + "/audit?name=tone", None, method="GET", headers=admin)
    acts = [(e["actor"], e["action"]) for e in audit["audit"]]
    assert ("carol", "activate") in acts and ("alice", "activate") in acts
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert 'fastpatch_requests_total{arm="control",set="tone",version="1.0.0"}' in text
    assert 'fastpatch_active_version{arm="control",set="tone",version="1.1.0"} 100.0' in text
    assert server["proc"].poll() is None
