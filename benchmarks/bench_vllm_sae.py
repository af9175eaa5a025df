"""SAE feature configs per request in vLLM: 64 requests with 64 distinct configs vs 64 requests with one config
(CPU, SmolLM2-135M, fp32, one in-process engine, interleaved, medians).

Same prompts, greedy, every request runs to max_tokens. Each config clamps 4 features of one JumpReLU SAE at
layers.12.resid_post (written in SAELens' folder format); "distinct" changes the clamp values per request, so
every request has its own content hash, its own bank row (sae_slots=64) and, for the first run, a row
write; "one" gives every request the same config (one row). A third case, "none", runs the same requests
unpatched (for scale). Each repetition runs every case once, in a rotated order; the row contents differ
between repetitions (values shift per rep) so every "distinct" run writes its 64 rows again. Run:

    OMP_NUM_THREADS=1 python benchmarks/bench_vllm_sae.py --reps 5

Issue #17 target: distinct / one <= 1.05. Not a test: timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integrations", "vllm"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from pathlib import Path

    from test_vllm_sae import write_saelens
    from vllm import LLM, SamplingParams

    from fastpatch.app.models import load_smollm2, smollm2_checkpoint

    hf, _ = load_smollm2()
    folder = write_saelens(Path(tempfile.mkdtemp()) / "sae", "blocks.12.hook_resid_post", "jumprelu",
                           hf.config.hidden_size, 0)
    del hf
    n = args.requests
    llm = LLM(model=str(smollm2_checkpoint()), enforce_eager=not args.compiled, dtype="float32", max_model_len=256,
              max_num_seqs=n, seed=0, enable_prefix_caching=False,
              additional_config={"fastpatch": {"saes": {"jr": folder}, "sae_slots": n, "max_sae_features": 4}})
    prompts = [f"Request {i}: once upon a time, in a small village," for i in range(n)]

    def params(section):
        extra = None if section is None else {"fastpatch": section}
        return SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, extra_args=extra)

    def case(name, rep):
        if name == "none":
            return [params(None) for _ in range(n)]
        if name == "one":
            return [params({"sae": "jr", "clamp": {"3": 2.0 + rep, "17": 1.0, "40": 0.5, "77": 3.0}})] * n
        return [params({"sae": "jr", "clamp": {"3": 2.0 + rep + 0.01 * i, "17": 1.0, "40": 0.5, "77": 3.0}})
                for i in range(n)]

    names = ["none", "one", "distinct"]
    llm.generate(prompts, case("distinct", -1), use_tqdm=False)  # warm-up
    times = {k: [] for k in names}
    for rep in range(args.reps):
        order = names[rep % 3:] + names[:rep % 3]
        for name in order:
            ps = case(name, rep)
            t0 = time.perf_counter()
            llm.generate(prompts, ps, use_tqdm=False)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"requests": n, "tokens": args.tokens, "reps": args.reps, "compiled": args.compiled,
           "median_s": med, "distinct_over_one": med["distinct"] / med["one"],
           "one_over_none": med["one"] / med["none"],
           "times": times, "load": open("/proc/loadavg").read().split()[0]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
