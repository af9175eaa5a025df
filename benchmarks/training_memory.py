"""Training memory and time through a patched model (issue 12, defects 4 and 5).

One forward + backward of a random-weight Llama (default: the issue's shape, hidden 1024, 3 layers,
one sequence of 2048 tokens, a rank-16 LowRank patch at ``layers.1.resid_post``), each variant in a
fresh subprocess so that its peak RSS is its own:

  plain                     the unpatched model
  plain_gc / plain_gc_re    the unpatched model with gradient_checkpointing_enable (non-reentrant /
                            reentrant)
  fp_empty                  fastpatch.apply(model, {})
  fp_lowrank16              a trainable rank-16 LowRank (fastpatch.kernels.autograd.TrainableBank)
  fp_lowrank16_gc / _gc_re  the same with checkpointing (non-reentrant / reentrant)
  fp_lowrank16_old_path     the same patch through the pre-fix autograd path (fused.run_norm falling back
                            to the float64 reference whenever the stream requires grad), for comparison

Measured per variant:

  saved_MiB      bytes of distinct activation storages autograd saves for backward in one forward
                 (torch.autograd.graph.saved_tensors_hooks; parameters excluded). Deterministic.
  peak_rss_MiB   peak RSS during one forward + backward minus the RSS just before it (after a small
                 warm-up forward + backward, so libraries and kernels are already loaded)
  fwd_bwd_ms     median wall time of forward + backward (noisy on a shared machine; loadavg is
                 recorded)
  recomputed     decoder-layer forward calls during backward (checkpointing: = layers)

With ``--op-timing`` it instead times one site's forward + backward, paired and round-robin (each
repeat runs every variant once, back to back, so machine load hits them alike), [tokens, hidden] fp32:

  torch_plain     h = x + r; Hugging Face's LlamaRMSNorm (fp32 upcast, rsqrt, weight) — no patch
  torch_lowrank   the same with h += (h·A + b)·B in torch ops (what a hook-based trainer runs)
  fp_plain        fastpatch.kernels.autograd.fused_add_norm, no bank
  fp_lowrank      the same with a rank-16 TrainableBank

    python benchmarks/training_memory.py                 # -> benchmarks/results/training_memory_<date>.{json,md}
    python benchmarks/training_memory.py --tokens 256 --hidden 256 --no-write
    python benchmarks/training_memory.py --op-timing --repeats 30
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("plain", "plain_gc", "plain_gc_re", "fp_empty", "fp_lowrank16", "fp_lowrank16_gc",
            "fp_lowrank16_gc_re", "fp_lowrank16_old_path")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args) -> dict:
    """Runs in the child process: build, warm up, measure; returns the numbers."""
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers as tf

    import fastpatch as fp
    from fastpatch.kernels import autograd as ag

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.tokens))
    cfg._attn_implementation = "sdpa"
    model = tf.LlamaForCausalLM(cfg).train()
    v = args.variant
    if v.endswith("_gc") or v.endswith("_gc_re"):
        model.gradient_checkpointing_enable({"use_reentrant": v.endswith("_re")})
    if v == "fp_empty":
        fp.apply(model, {})
    elif v.startswith("fp_lowrank16"):
        D, r = args.hidden, 16
        g = torch.Generator().manual_seed(1)
        bank = ag.TrainableBank([fp.LowRank(torch.randn(D, r, generator=g) / D**0.5,
                                            torch.randn(r, D, generator=g) / r**0.5)], D)
        fp.apply(model, {"layers.1.resid_post": bank})
        if v.endswith("old_path"):
            _old_run_norm()

    calls = [0]
    for layer in model.model.layers:
        # a pre-hook: non-reentrant checkpointing stops a recompute early once it has every saved
        # tensor back, so a forward hook after the MLP may never run even though the layer was recomputed
        layer.self_attn.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    def step(ids):
        model.zero_grad(set_to_none=True)
        loss = model(ids, use_cache=False).logits.float().square().mean()
        fwd = calls[0]
        loss.backward()
        return calls[0] - fwd

    warm = torch.randint(0, args.vocab, (1, 16))
    step(warm)
    ids = torch.randint(0, args.vocab, (1, args.tokens))

    # saved-for-backward bytes (one forward, graph dropped)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, use_cache=False).logits
    del out
    saved = sum(seen.values())

    model.zero_grad(set_to_none=True)
    rss0 = _rss_mib()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    recomputed = step(ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = [(time.perf_counter() - t0) * 1e3]  # --repeats 0: the measured step's own time
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(ids)
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(variant=v, saved_MiB=saved / 2**20, peak_rss_MiB=max(0.0, peak - max(rss0, 0.0)),
                peak_grew=peak > peak0, rss_before_MiB=rss0, fwd_bwd_ms=statistics.median(times[1:] or times),
                recomputed=recomputed, torch=torch.__version__, transformers=tf.__version__)


def _old_run_norm():
    """The pre-fix autograd path, reproduced for comparison: the float64 reference when the stream
    requires grad, the kernel (no gradient to anything) otherwise."""
    from fastpatch.integrations.hf import fused
    from fastpatch.kernels.backends import reference_backend

    def run_norm(run, x2, r2, norm, slot):
        if x2.requires_grad or (r2 is not None and r2.requires_grad):
            run = reference_backend.run
        mod = norm.module
        b = mod.bias if norm.has_bias else None
        if slot is None:
            return run(x2, r2, mod.weight, b, norm.eps, norm.kind, norm.offset, None, None, None, None, None)
        return run(x2, r2, mod.weight, b, norm.eps, norm.kind, norm.offset, slot[0], slot[1], slot[2], None, None)

    fused.run_norm = run_norm


def op_timing(args) -> list:
    """Paired forward + backward times of one site (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    import torch

    import fastpatch as fp
    from fastpatch.kernels import autograd as ag

    torch.set_num_threads(args.threads)
    N, D, r = args.tokens, args.hidden, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    res = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(D, generator=g))
    A = torch.nn.Parameter(torch.randn(D, r, generator=g) / D**0.5)
    Bm = torch.nn.Parameter(torch.randn(r, D, generator=g) / r**0.5)
    b = torch.nn.Parameter(torch.zeros(r))
    bank = ag.TrainableBank([fp.LowRank(A.detach(), Bm.detach())], D)
    gout, gres = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)

    def hf_norm(h):
        hf = h.to(torch.float32)
        var = hf.pow(2).mean(-1, keepdim=True)
        return w * (hf * torch.rsqrt(var + 1e-6)).to(h.dtype)

    def torch_plain():
        h = x + res
        return hf_norm(h), h

    def torch_lowrank():
        h = x + res
        h = h + (h @ A + b) @ Bm
        return hf_norm(h), h

    def fp_plain():
        return ag.fused_add_norm(x, res, w, eps=1e-6)

    def fp_lowrank():
        return ag.fused_add_norm(x, res, w, eps=1e-6, bank=bank)

    variants = {"torch_plain": torch_plain, "torch_lowrank": torch_lowrank, "fp_plain": fp_plain,
                "fp_lowrank": fp_lowrank}
    times = {k: [] for k in variants}
    for rep in range(args.repeats + 2):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            o, h = fn()
            torch.autograd.backward((o, h), (gout, gres))
            dt = (time.perf_counter() - t0) * 1e3
            if rep >= 2:  # two warm-up rounds
                times[name].append(dt)
    rows = []
    for name in variants:
        rows.append(dict(variant=name, median_ms=statistics.median(times[name]),
                         vs_torch_plain=statistics.median(a / p for a, p in zip(times[name], times["torch_plain"])),
                         vs_torch_lowrank=statistics.median(a / p for a, p in zip(times[name],
                                                                                times["torch_lowrank"]))))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--op-timing", action="store_true", help="time one site's forward + backward instead")
    args = ap.parse_args(argv)
    if args.op_timing:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
        rows = op_timing(args)
        for r in rows:
            print(f"{r['variant']:14s} {r['median_ms']:8.2f} ms   /torch_plain {r['vs_torch_plain']:.3f}   "
                  f"/torch_lowrank {r['vs_torch_lowrank']:.3f}")
        print(f"[{args.tokens} x {args.hidden}] fp32, {args.threads} threads, {args.repeats} paired repeats, "
              f"loadavg before: {load}, after: {' '.join(open('/proc/loadavg').read().split()[:3])}")
        return 0
    if args.variant:  # child
        print(json.dumps(run_variant(args)))
        return 0
    rows = []
    for v in args.variants:
        cmd = [sys.executable, __file__, "--variant", v] + [
            f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "heads", "vocab", "tokens",
                                                  "threads", "repeats")]
        load = open("/proc/loadavg").read().split()[:3]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["loadavg"] = " ".join(load)
        rows.append(row)
        print(f"{v:24s} saved {row['saved_MiB']:8.1f} MiB  peak RSS +{row['peak_rss_MiB']:8.1f} MiB  "
              f"fwd+bwd {row['fwd_bwd_ms']:8.1f} ms  recomputed {row['recomputed']}  (load {row['loadavg']})",
              flush=True)
    if not args.no_write:
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        tfv = rows[0]["transformers"] if rows else "unknown"
        # one file per transformers version: the checkpointing mechanism differs between releases
        out = ROOT / "benchmarks" / "results" / f"training_memory_{date}_tf{tfv}"
        shape = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab", "tokens",
                                               "threads", "repeats")}
        out.with_name(out.name + ".json").write_text(json.dumps({"shape": shape, "rows": rows}, indent=1))
        lines = [f"# Training memory, {date}, transformers {tfv}", "",
                 f"Llama {shape}, fp32, CPU, one forward + backward; torch {rows[0]['torch'] if rows else '?'}, "
                 f"transformers {tfv}.",
                 "The memory columns are what this measures; fwd+bwd ms on a shared machine follows its load "
                 "(see loadavg): compare times with --op-timing's paired ratios instead.", "",
                 "| variant | saved for backward MiB | peak RSS increase MiB | fwd+bwd ms | layers recomputed "
                 "| loadavg |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['saved_MiB']:.1f} | {r['peak_rss_MiB']:.1f} | {r['fwd_bwd_ms']:.0f} "
                         f"| {r['recomputed']} | {r['loadavg']} |")
        out.with_name(out.name + ".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out}.json/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
