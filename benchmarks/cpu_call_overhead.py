"""CPU per-call cost of the public op on small shapes (where host overhead dominates), µs per call.

    python benchmarks/cpu_call_overhead.py                      # one round, prints a JSON line
    python benchmarks/cpu_call_overhead.py --compare OLD_TREE --rounds 7
        # interleaved: alternately runs this script in OLD_TREE (another checkout, e.g. from `git archive`)
        # and in this one, each in a fresh process, and prints the medians of the rounds side by side

Variants (one thread, bank and weight in the activation dtype, after a warm-up call):

  public[p]   fastpatch.fused_add_norm(x, residual, weight, bank=..., out=x, residual_out=residual): the
              fast path (plan cached after the first call), in place like vLLM's kernel
  checked[p]  the same call with a fresh ``weight`` view each call, so no plan matches: check_inputs and
              the backend's run every call (the first-call path)
  run[p]      ``backends.resolve(None, "cpu").run(x, r, w, None, NormSpec, bank.kernel_args(), ...)``: what
              the integrations call per site (HF fused forwards, vLLM norms)
  backend[p]  the same call in a tree from before NormSpec (the 12-argument ``run``), for --compare

Each timing is the median over 21 batches of 200 calls; --compare reports the median over rounds.
Correctness lives in tests/; this only times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ((1, 576), (4, 2048))
PATCHES = ("none", "steer", "rank16")


def _bank(patch, D, dtype, gen):
    import torch

    import fastpatch as fp

    if patch == "none":
        return None
    if patch == "steer":
        return fp.PatchBank([fp.Steer(torch.randn(D, generator=gen) * 0.1)], dtype=dtype)
    basis = torch.linalg.qr(torch.randn(D, 16, generator=gen))[0].t().contiguous()
    return fp.PatchBank([fp.LowRank(A=basis.t(), B=-0.5 * basis)], dtype=dtype)


def _time(fn, batches=21, calls=200):
    fn()
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def one_round() -> dict:
    import torch

    import fastpatch as fp
    from fastpatch.kernels import backends

    NormSpec = getattr(backends, "NormSpec", None)
    torch.set_num_threads(1)
    impl = backends.resolve(None, torch.device("cpu"))
    results = {}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for N, D in SHAPES:
            for patch in PATCHES:
                dtype = torch.float32
                x = torch.randn(N, D, generator=gen) * 0.1
                r = torch.randn(N, D, generator=gen)
                w = torch.ones(D)
                bank = _bank(patch, D, dtype, gen)
                tag = f"{N}x{D}/{patch}"
                results[f"public[{tag}]"] = _time(
                    lambda: fp.fused_add_norm(x, r, w, bank=bank, eps=1e-6, out=x, residual_out=r))
                results[f"checked[{tag}]"] = _time(
                    lambda: fp.fused_add_norm(x, r, w[:], bank=bank, eps=1e-6, out=x, residual_out=r))
                if NormSpec is None:  # a tree from before NormSpec: its backends take the 12-argument form
                    results[f"backend[{tag}]"] = _time(
                        lambda: impl.run(x, r, w, None, 1e-6, 0, 0.0, bank, None, None, x, r))
                else:
                    spec, args = NormSpec(0, 1e-6, 0.0), (None if bank is None else bank.kernel_args())
                    results[f"run[{tag}]"] = _time(lambda: impl.run(x, r, w, None, spec, args, None, None, x, r))
    return results


def compare(old_tree: Path, rounds: int) -> None:
    here = Path(__file__).resolve().parents[1]
    runs = {"before": [], "after": []}
    for i in range(rounds):
        for label, tree in (("before", old_tree), ("after", here)):
            env = dict(os.environ, PYTHONPATH=str(tree))
            if label == "before":  # its own extension cache: the two trees build different sources
                env["TORCH_EXTENSIONS_DIR"] = os.environ.get("OLD_TORCH_EXTENSIONS_DIR", "/tmp/fp_ext_before")
            out = subprocess.run([sys.executable, str(tree / "benchmarks" / "cpu_call_overhead.py")], env=env,
                                 cwd=str(tree), capture_output=True, text=True, check=True).stdout
            runs[label].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {i + 1}/{rounds} {label} done", file=sys.stderr, flush=True)
    print(f"{'variant':28s} {'before µs':>10s} {'after µs':>10s} {'after/before':>12s}")
    for key in runs["after"][0]:
        a = statistics.median(r[key] for r in runs["after"])
        if key not in runs["before"][0]:
            print(f"{key:28s} {'-':>10s} {a:10.2f}")
            continue
        b = statistics.median(r[key] for r in runs["before"])
        print(f"{key:28s} {b:10.2f} {a:10.2f} {a / b:12.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, help="another checkout to compare against, interleaved")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.compare:
        compare(args.compare.resolve(), args.rounds)
    else:
        print(json.dumps(one_round()))
