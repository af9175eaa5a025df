"""Load test of governed serving over loopback HTTP.

A tiny random-weight Llama is served by fastpatch.app.admin_server (generation endpoint + admin API, one
process, ThreadingHTTPServer) through fastpatch.lifecycle.Serving. N client threads send generation
requests across 3 patch sets (sticky keys, region labels; one set is scoped to region "eu") while an
operator thread publishes versions over the admin API, rolls them out (canary, A/B arms), promotes,
aborts and rolls back. Checked, per response:

- no failed request (HTTP 200, well-formed);
- zero mixed-version steps: every decode step's logits equal those of the version the response reports,
  computed beforehand by an independent oracle (plain forward hooks on the unpatched model; no fastpatch
  code) within 1e-4; a step of any other version, or of a mix, differs by far more;
- every served version matches the audit log: replaying the set's audit entries up to the generation the
  request was served at gives exactly the (arm, version) the response reports for its key and labels.

    python benchmarks/load_registry.py --clients 8 --requests 40        # writes benchmarks/results/
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SETS = {"tone": 100, "style": 200, "safety": 300}  # name -> seed of its versions' vectors
SCOPED = "safety"  # policy: regions ["eu"]
VERSIONS = ["1.0.0", "1.1.0", "1.2.0", "1.3.0"]
SITES = ("layers.0.resid_post", "layers.1.resid_post")
PROMPTS = [[5, 17, 33, 2, 90, 41], [8, 8, 12, 77, 3, 19], [100, 4, 55, 6, 7, 21]]
ADMIN, READER = "admin-token-0123456789", "read-token-0123456789"


def tiny_llama(seed: int = 0):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def vectors(name: str, version: str) -> dict:
    seed = SETS[name] + VERSIONS.index(version) * 10
    g = torch.Generator().manual_seed(seed)
    return {site: torch.randn(64, generator=g) * 4 for site in SITES}


def oracle(model, vecs, prompt, new_tokens):
    """Per-step logits with plain forward hooks adding each site's vector (independent of fastpatch)."""
    hooks = [model.model.layers[int(s.split(".")[1])].register_forward_hook(lambda m, a, o, v=v: o + v)
             for s, v in (vecs or {}).items()]
    try:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        return torch.stack([x[0] for x in out.logits])
    finally:
        for h in hooks:
            h.remove()


def _call(url, token, body=None, timeout=120):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


def replay(audit: list, name: str, generation: int) -> dict:
    """The rollout state of ``name`` after the audit entries up to ``generation`` (audit id == generation)."""
    from fastpatch.lifecycle import rollout as ro

    s = ro.empty()
    for e in audit:
        if e["id"] > generation or e["name"] != name:
            continue
        a = e["action"]
        if a == "activate":
            s = ro.activate(s, e["version"])
        elif a == "rollout":
            s = ro.canary(s, e["version"], e["percent"])
        elif a == "experiment":
            s = ro.experiment(s, {k: tuple(v) for k, v in e["arms"].items()})
        elif a == "promote":
            s = ro.promote(s, e.get("arm"))
        elif a in ("abort", "pause", "resume", "rollback"):
            s = getattr(ro, a)(s)
    return s


def run(clients: int = 6, requests: int = 20, new_tokens: int = 3, max_seconds: float = 300.0,
        seed: int = 0, quiet: bool = True) -> dict:
    import fastpatch
    from fastpatch.app.admin_server import AdminServer
    from fastpatch.lifecycle import rollout as ro
    from fastpatch.lifecycle.governance import Governance
    from fastpatch.lifecycle.serving import Serving
    from fastpatch.lifecycle.store import SQLiteStore

    model = tiny_llama(seed)
    expected = {}
    for p_i, prompt in enumerate(PROMPTS):
        expected[(None, None, p_i)] = oracle(model, None, prompt, new_tokens)
        for name in SETS:
            for v in VERSIONS:
                expected[(name, v, p_i)] = oracle(model, vectors(name, v), prompt, new_tokens)
    gap = min(float((expected[a] - expected[b]).abs().max()) for a in expected for b in expected
              if a != b and a[2] == b[2])

    tmp = tempfile.mkdtemp(prefix="fastpatch-load-")
    files = {}
    for name in SETS:
        for v in VERSIONS:
            path = Path(tmp) / f"{name}-{v}.safetensors"
            fastpatch.save({s: fastpatch.Steer(x) for s, x in vectors(name, v).items()}, path, name=name, version=v)
            files[(name, v)] = base64.b64encode(path.read_bytes()).decode()
    gov = Governance(SQLiteStore(Path(tmp) / "store"), actor="setup")
    serving = Serving(gov, model, poll_interval=0.0)
    server = AdminServer(gov, {ADMIN: {"actor": "operator", "role": "admin"},
                               READER: {"actor": "client", "role": "read"}}, serving=serving)
    host, port = server.start()
    base = f"http://{host}:{port}"

    def admin(path, body):
        status, _, out = _call(base + path, ADMIN, body)
        if status != 200:
            raise RuntimeError(f"{path}: {status} {out}")
        return out

    admin(f"/v1/sets/{SCOPED}", {"policy": {"regions": ["eu"]}})
    for name in SETS:
        admin(f"/v1/sets/{name}/versions", {"version": "1.0.0", "patches": {"p": files[(name, "1.0.0")]}})
        admin(f"/v1/sets/{name}/activate", {"version": "1.0.0"})

    responses, failures = [], []
    stop = threading.Event()
    t_start = time.monotonic()

    def client(c):
        rng = random.Random(seed * 1000 + c)
        k = 0
        # At least `requests` each, and on until the operator has run its whole plan (bounded by max_seconds).
        while (k < requests or not stop.is_set()) and time.monotonic() - t_start < max_seconds:
            k += 1
            name = rng.choice(list(SETS))
            p_i = rng.randrange(len(PROMPTS))
            body = {"patch_set": name, "key": f"user-{rng.randrange(50)}",
                    "labels": {"region": rng.choice(["eu", "us"])}, "input_ids": PROMPTS[p_i],
                    "max_new_tokens": new_tokens, "return_logits": True}
            t0 = time.monotonic()
            try:
                status, headers, out = _call(base + "/v1/generate", READER, body)
            except Exception as exc:  # connection-level failure
                failures.append(f"client {c}: {type(exc).__name__}: {exc}")
                continue
            dt = time.monotonic() - t0
            if status != 200 or "served" not in out:
                failures.append(f"client {c}: HTTP {status} {out}")
                continue
            responses.append((body, p_i, out, headers.get("X-Fastpatch-Version"), dt))

    def operator():
        rng = random.Random(seed + 7)
        plan = []
        for name in SETS:
            plan += [("publish", name, "1.1.0"), ("canary", name, "1.1.0", 10), ("canary", name, "1.1.0", 50),
                     ("promote", name), ("publish", name, "1.2.0"), ("canary", name, "1.2.0", 30), ("abort", name),
                     ("publish", name, "1.3.0"), ("experiment", name), ("promote_arm", name), ("rollback", name)]
        # Interleave the sets' plans (each set keeps its own order).
        queues = {n: [p for p in plan if p[1] == n] for n in SETS}
        while any(queues.values()) and time.monotonic() - t_start < max_seconds:
            n = rng.choice([n for n, q in queues.items() if q])
            step = queues[n].pop(0)
            op, name = step[0], step[1]
            if op == "publish":
                admin(f"/v1/sets/{name}/versions", {"version": step[2], "patches": {"p": files[(name, step[2])]}})
            elif op == "canary":
                admin(f"/v1/sets/{name}/rollout", {"version": step[2], "percent": step[3]})
            elif op == "experiment":
                admin(f"/v1/sets/{name}/rollout", {"arms": {"b": ["1.2.0", 30], "c": ["1.3.0", 30]}})
            elif op == "promote_arm":
                admin(f"/v1/sets/{name}/promote", {"arm": "c"})
            else:
                admin(f"/v1/sets/{name}/{op}", {})
            time.sleep(rng.uniform(0.0, 0.15))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    op_thread = threading.Thread(target=operator)
    op_thread.start()
    for t in threads:
        t.start()
    op_thread.join()
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start

    _, _, audit = _call(base + "/v1/audit", READER)
    audit = audit["audit"]
    mixed_steps, audit_mismatch, header_mismatch, served = 0, [], 0, {}
    for body, p_i, out, header, _dt in responses:
        s = out["served"]
        key = (s["patch_set"], s["version"], p_i) if s["version"] else (None, None, p_i)
        got = torch.tensor(out["logits"])
        want = expected[key]
        for step in range(got.shape[0]):
            if not torch.allclose(got[step], want[step], rtol=1e-4, atol=1e-4):
                mixed_steps += 1
        if header != f"{s['patch_set']}@{s['version'] or 'none'} ({s['arm']})":
            header_mismatch += 1
        state = replay(audit, s["patch_set"], s["generation"])
        in_scope = s["patch_set"] != SCOPED or body["labels"]["region"] == "eu"
        arm, version = ro.assign(state, s["patch_set"], body["key"]) if in_scope else (ro.CONTROL, None)
        if (arm, version) != (s["arm"], s["version"]):
            audit_mismatch.append({"served": s, "audit_says": [arm, version]})
        label = f"{s['patch_set']}@{s['version'] or 'none'}"
        served[label] = served.get(label, 0) + 1
    _, _, metrics = None, None, None
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {READER}"})
    with urllib.request.urlopen(req) as r:
        metrics = r.read().decode()
    server.stop()
    serving.close()
    lat = sorted(r[4] for r in responses)
    changes = sum(1 for e in audit if e["action"] not in ("create_set",))
    result = {
        "clients": clients, "requests_per_client": requests, "new_tokens": new_tokens,
        "requests_ok": len(responses), "failed": len(failures), "failures": failures[:5],
        "mixed_version_steps": mixed_steps, "steps_checked": sum(len(r[2]["logits"]) for r in responses),
        "audit_mismatches": len(audit_mismatch), "audit_mismatch_examples": audit_mismatch[:3],
        "header_mismatches": header_mismatch, "admin_changes_during_run": changes,
        "served_versions": dict(sorted(served.items())), "min_logit_gap_between_versions": gap,
        "elapsed_s": round(elapsed, 2), "throughput_req_s": round(len(responses) / elapsed, 2),
        "latency_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "latency_p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
        "loadavg": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
        "torch_threads": torch.get_num_threads(),
    }
    if not quiet:
        print(json.dumps(result, indent=1))
    result["_metrics_sample"] = metrics
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=40, help="per client, at least (they go on until the "
                    "operator's plan is done)")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--max-seconds", type=float, default=480)
    ap.add_argument("--out", default=str(HERE / "results" / "load_registry"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    res = run(args.clients, args.requests, args.new_tokens, args.max_seconds, quiet=True)
    metrics = res.pop("_metrics_sample")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["# Governed serving under load (loopback HTTP)", "",
             f"`python benchmarks/load_registry.py --clients {args.clients} --requests {args.requests} "
             f"--new-tokens {args.new_tokens}` (tiny random Llama, CPU, torch threads {res['torch_threads']}, "
             f"loadavg {' '.join(res['loadavg'] or [])})", "",
             "| figure | value |", "|---|---|"]
    for k in ("requests_ok", "failed", "steps_checked", "mixed_version_steps", "audit_mismatches",
              "header_mismatches", "admin_changes_during_run", "elapsed_s", "throughput_req_s", "latency_p50_ms",
              "latency_p95_ms", "min_logit_gap_between_versions"):
        lines.append(f"| {k} | {res[k]} |")
    lines += ["", "Served versions: " + ", ".join(f"{k} x{v}" for k, v in res["served_versions"].items()), "",
              "Prometheus sample at the end of the run:", "", "```", metrics.strip(), "```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines[:20]))
    ok = res["failed"] == 0 and res["mixed_version_steps"] == 0 and res["audit_mismatches"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
