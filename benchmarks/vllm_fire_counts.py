"""What counting fires costs in vLLM (CPU, SmolLM2-135M, fp32, eager), interleaved, medians.

Two measurements:

- engine: one in-process engine with a steer at every layer (30 sites, ``layers.i.resid_post``); every
  request names it. Each repetition times ``llm.generate`` with the kernels counting fires (as the plugin
  runs) and with the sites' fire-count argument switched to None (the closure cell of each patched forward;
  a benchmark-only switch, the plugin has none), in alternating order.
- kernel: one patched-norm call (the cpp backend, ``impl.run``) on decode-sized inputs (rows x 576), a bank
  of 4 rows (one gated), with and without a fire-count tensor, interleaved blocks of calls.

    OMP_NUM_THREADS=1 python benchmarks/vllm_fire_counts.py --reps 7

Not a test: the machine is shared and noisy; the load average is printed with the results.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _fire_cells(model) -> list:
    """The ``fire`` closure cells of every patched norm forward (fastpatch.integrations.vllm.model)."""
    cells = []
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        func = getattr(fwd, "__func__", None)
        if getattr(func, "_fastpatch_site", None) is None:
            continue
        cells.append(func.__closure__[func.__code__.co_freevars.index("fire")])
    return cells


def engine_case(reps: int, batch: int, tokens: int) -> dict:
    import fastpatch
    from fastpatch.app.models import load_smollm2, smollm2_checkpoint
    from vllm import LLM, SamplingParams

    hf, _ = load_smollm2()
    d, n_layers = hf.config.hidden_size, hf.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    mapping = {f"layers.{i}.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 0.1) for i in range(n_layers)}
    folder = tempfile.mkdtemp()
    path = str(fastpatch.save(mapping, os.path.join(folder, "all.safetensors"), model=hf))
    del hf
    llm = LLM(model=str(smollm2_checkpoint()), enforce_eager=True, dtype="float32", max_model_len=256,
              max_num_seqs=batch, seed=0, enable_prefix_caching=False,
              additional_config={"fastpatch": {"patches": {"all": path}}})
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    cells = _fire_cells(model)
    buffers = [c.cell_contents for c in cells]
    assert len(cells) == n_layers and all(b is not None for b in buffers)
    prompts = [f"Request {i}: the weather today is" for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, extra_args={"fastpatch": "all"})

    def run(counting: bool) -> float:
        for c, b in zip(cells, buffers):
            c.cell_contents = b if counting else None
        t0 = time.perf_counter()
        llm.generate(prompts, [params] * batch, use_tqdm=False)
        return time.perf_counter() - t0

    run(True), run(False)  # warm-up
    times = {True: [], False: []}
    for r in range(reps):
        for counting in ((True, False) if r % 2 == 0 else (False, True)):
            times[counting].append(run(counting))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    paired = statistics.median([a / b for a, b in zip(times[True], times[False])])
    return dict(on=on, off=off, paired_ratio=paired, batch=batch, tokens=tokens, sites=n_layers)


def kernel_case(rows: int, reps: int, calls: int) -> dict:
    import fastpatch
    from fastpatch.core.bank import PatchBank
    from fastpatch.kernels import backends

    d = 576
    g = torch.Generator().manual_seed(1)
    bank = PatchBank([fastpatch.Steer(torch.randn(d, generator=g)),
                      fastpatch.Gated(fastpatch.Steer(torch.randn(d, generator=g)), torch.randn(d, generator=g), 0.0),
                      fastpatch.Ablate(torch.randn(d, generator=g)), fastpatch.Steer(torch.randn(d, generator=g))], d)
    impl = backends.resolve("cpp", torch.device("cpu"))
    spec = backends.NormSpec(0, 1e-5, 0.0)
    x, r, w = torch.randn(rows, d), torch.randn(rows, d), torch.ones(d)
    index = torch.randint(-1, 4, (rows,), generator=g, dtype=torch.int32)
    fire = torch.zeros(4, dtype=torch.int32)
    out, summed = torch.empty_like(x), torch.empty_like(x)
    args = bank.kernel_args()

    def block(f) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            impl.run(x, r, w, None, spec, args, index, f, out, summed)
        return (time.perf_counter() - t0) / calls * 1e6

    block(fire), block(None)
    times = {True: [], False: []}
    for i in range(reps):
        for counting in ((True, False) if i % 2 == 0 else (False, True)):
            times[counting].append(block(fire if counting else None))
    return dict(rows=rows, on_us=statistics.median(times[True]), off_us=statistics.median(times[False]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--skip-engine", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {_loadavg()}  (cores: {os.cpu_count()})")
    for rows in (1, 8, 64):
        k = kernel_case(rows, max(a.reps, 9), 2000)
        print(f"kernel rows={rows:3d}: with fire counts {k['on_us']:.2f} us/call, without {k['off_us']:.2f} us/call "
              f"({k['on_us'] / k['off_us']:.3f}x)")
    if not a.skip_engine:
        e = engine_case(a.reps, a.batch, a.tokens)
        print(f"engine ({e['sites']} sites, batch {e['batch']}, {e['tokens']} tokens): with fire counts "
              f"{e['on']:.3f} s, without {e['off']:.3f} s (medians of {a.reps}); paired median ratio "
              f"{e['paired_ratio']:.3f}")
    print(f"load average after: {_loadavg()}")


if __name__ == "__main__":
    main()
