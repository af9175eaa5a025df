"""vanilla vLLM vs vLLM + fastpatch, in one process, interleaved, medians (CPU, SmolLM2-135M, fp32).

Cases (same prompts, greedy, fixed decode length, every request runs to max_tokens):

- small batch (B requests, T tokens): vanilla; fastpatch engine with requests naming no patch; a steer at
  one layer; a steer at every layer (30 sites) — for norm="exact" and norm="fused"
- large batch (K_BATCH requests, T_K tokens): vanilla; K = 1, 8, 32, 256 distinct steering patches (all at
  layers.10.resid_post) spread over the batch (request r names patch r mod K); norm="exact" unless --k-norms

Three in-process engines live side by side (vanilla, exact, fused); each repetition runs every case once, in
a rotated order, so slow phases of a shared machine spread over all cases. Time = wall time of
``llm.generate`` (scheduling, forward, sampling: what a user waits for). Run:

    OMP_NUM_THREADS=1 python benchmarks/bench_vllm.py --reps 5 --out benchmarks/results/vllm_cpu

OMP_NUM_THREADS=1: vLLM's CPU worker wants one torch thread ("Reducing Torch threads ... for serving") but
cannot set it after its thread binding; on a shared, loaded 2-core machine two OpenMP threads made every
decode step ~9x slower (their barriers wait for a descheduled thread) and the timings useless.

Not a test: timings on a shared machine are noisy; the load average is recorded with the results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

KS = (1, 8, 32, 256)


def _loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split(" ")[0]
    except OSError:
        return "n/a"


def make_patches(folder: str, hf, n_layers: int, k_max: int) -> dict:
    import fastpatch

    g = torch.Generator().manual_seed(0)
    d = hf.config.hidden_size
    files = {"one": fastpatch.save({"layers.10.resid_post": fastpatch.Steer(torch.randn(d, generator=g))},
                                   os.path.join(folder, "one.safetensors"), model=hf),
             "every": fastpatch.save({f"layers.{i}.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 0.3)
                                      for i in range(n_layers)}, os.path.join(folder, "every.safetensors"), model=hf)}
    fp = fastpatch.fingerprint(hf)
    for k in range(k_max):
        files[f"k{k}"] = fastpatch.save({"layers.10.resid_post": fastpatch.Steer(torch.randn(d, generator=g))},
                                        os.path.join(folder, f"k{k}.safetensors"), model=fp)
    return {n: str(p) for n, p in files.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="B, the small batch")
    ap.add_argument("--tokens", type=int, default=32, help="T, decoded tokens per request (small batch)")
    ap.add_argument("--k-batch", type=int, default=256, help="requests in the K cases")
    ap.add_argument("--k-tokens", type=int, default=8, help="decoded tokens per request in the K cases")
    ap.add_argument("--k-norms", default="exact", help="norm modes timed in the K cases (comma-separated)")
    ap.add_argument("--compiled", action="store_true", help="vLLM's default torch.compile mode (else eager)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--render", default=None, help="print the markdown of a saved OUT.json and exit")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        for r in result["rows"]:  # results saved before the best-of columns existed
            base = next(x for x in result["rows"] if x["batch"] == r["batch"] and x["norm"] == "vanilla")
            r.setdefault("best_s", min(r["times_s"]))
            r.setdefault("best_vs_vanilla", min(r["times_s"]) / min(base["times_s"]))
        print(render(result))
        return

    from fastpatch.app.models import load_smollm2, smollm2_checkpoint
    from vllm import LLM, SamplingParams

    hf, _ = load_smollm2()
    n_layers = hf.config.num_hidden_layers
    folder = str(smollm2_checkpoint())
    tmp = tempfile.mkdtemp(prefix="bench_vllm_")
    files = make_patches(tmp, hf, n_layers, max(KS))
    del hf
    common = dict(model=folder, enforce_eager=not args.compiled, dtype="float32", max_model_len=128,
                  max_num_seqs=max(args.k_batch, args.batch), max_num_batched_tokens=4096, seed=0,
                  enable_prefix_caching=False)
    t0 = time.time()
    engines = {"vanilla": LLM(**common)}
    for mode in ("exact", "fused"):
        engines[mode] = LLM(**common, additional_config={"fastpatch": {"patches": files, "norm": mode}})
    print(f"engines started in {time.time() - t0:.0f} s")

    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    prompts = lambda n: [" ".join(words[(i % 7):] + words[:(i % 7)]) for i in range(n)]  # noqa: E731

    def params(names, n):
        return [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                               extra_args=None if name is None else {"fastpatch": name}) for name in names]

    B, T, KB, KT = args.batch, args.tokens, args.k_batch, args.k_tokens
    cases = {("small", "vanilla", "-"): ("vanilla", prompts(B), params([None] * B, T))}
    for mode in ("exact", "fused"):
        cases[("small", mode, "no patch")] = (mode, prompts(B), params([None] * B, T))
        cases[("small", mode, "steer 1 layer")] = (mode, prompts(B), params(["one"] * B, T))
        cases[("small", mode, f"steer {n_layers} layers")] = (mode, prompts(B), params(["every"] * B, T))
    if KB:
        cases[("K", "vanilla", "-")] = ("vanilla", prompts(KB), params([None] * KB, KT))
        for mode in args.k_norms.split(","):
            for k in KS:
                cases[("K", mode, f"K={k}")] = (mode, prompts(KB), params([f"k{r % k}" for r in range(KB)], KT))

    for key, (eng, ps, sp) in cases.items():  # warm-up, not timed
        engines[eng].generate(ps[:2], sp[:2], use_tqdm=False)
    times = {key: [] for key in cases}
    loads = []
    keys = list(cases)
    for rep in range(args.reps):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for key in order:
            eng, ps, sp = cases[key]
            t = time.perf_counter()
            engines[eng].generate(ps, sp, use_tqdm=False)
            times[key].append(time.perf_counter() - t)
        loads.append(_loadavg())
        print(f"rep {rep + 1}/{args.reps} done, load {loads[-1]}")

    rows = []
    for key in keys:
        group = key[0]
        base = times[(group, "vanilla", "-")]
        rows.append({"batch": B if group == "small" else KB, "tokens": T if group == "small" else KT, "norm": key[1],
                     "case": key[2], "median_s": statistics.median(times[key]), "best_s": min(times[key]),
                     "vs_vanilla": statistics.median(times[key]) / statistics.median(base),
                     "best_vs_vanilla": min(times[key]) / min(base), "times_s": times[key]})
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "compiled": args.compiled, "reps": args.reps,
              "loadavg_per_rep": loads, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    text = render(result)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")


def render(result: dict) -> str:
    """The markdown table of a result dict (also: python benchmarks/bench_vllm.py --render OUT.json)."""
    lines = [f"vLLM {'compiled' if result['compiled'] else 'eager'} on CPU, SmolLM2-135M fp32, {result['reps']} "
             f"interleaved reps ({result['date']}, torch threads {result['threads']}); wall time of llm.generate; "
             f"load average per rep: {', '.join(result['loadavg_per_rep'])}", "",
             "| batch x tokens | norm | case | median s | vs vanilla (median) | best s | vs vanilla (best) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        best = r.get("best_s", min(r["times_s"]))
        lines.append(f"| {r['batch']} x {r['tokens']} | {r['norm']} | {r['case']} | {r['median_s']:.3f} | "
                     f"{r['vs_vanilla']:.3f}x | {best:.3f} | {r.get('best_vs_vanilla', float('nan')):.3f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
