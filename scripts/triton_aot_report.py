#!/usr/bin/env python
"""Compile every fastpatch Triton kernel config ahead of time for sm_80/sm_90 and report resources.

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` emits a cubin,
and the wheel's ``cuobjdump --dump-resource-usage`` reads its registers / stack / shared memory.
The configs come from the dispatcher (``dispatch.all_configs()``), not from a hand list. Each config
is compiled with flag sets ("variants"): ``full`` turns on every optional part (the most
registers), ``plain`` is the unpatched fused add + RMSNorm. Exit status is non-zero on a compile
error, or when a config the dispatcher can pick has STACK > 0 (register spills).

What is compiled is what the JIT compiles for ``apply()``'s calls:

- dtype mixes (``--mixes``, activations/bank): the bank in the activations' dtype (bf16/bf16,
  fp16/fp16, fp32/fp32: what ``apply()`` builds) and fp32 banks under 16-bit activations (an
  explicit float32 ``PatchBank``); the norm weight in the activations' dtype; an int32 index (the
  engine's) — each config only with the mixes that can select it (fp32-dot tiles need an fp32 bank).
- specialisation (``--spec``): ``jit`` gives every pointer and the hidden size and rank the
  ``tt.divisibility=16`` attribute, as the JIT does for 16-byte aligned tensors and integers
  divisible by 16 (torch allocations; hidden sizes and ranks of real models); ``none`` compiles
  the unspecialised kernel (an odd hidden size such as 4097, a view at an odd offset).

    python scripts/triton_aot_report.py [--arch 80 90] [--variants full plain] [--mixes bf16/bf16 bf16/fp32]
                                        [--spec jit] [--markdown out.md] [--json out.json] [--jobs 2]

TRITON_INTERPRET must be unset (the interpreter replaces the compiler); the script unsets it for
itself before importing triton.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must happen before any @triton.jit runs
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastpatch.kernels.triton_ops import dispatch  # noqa: E402  (pure Python)

TYPE_NAMES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
MIXES = ("bf16/bf16", "fp16/fp16", "fp32/fp32", "bf16/fp32", "fp16/fp32")  # activations/bank
DIVISIBLE_INTS = ("D", "rank")  # ints the JIT sees divisible by 16 on real shapes

# Optional parts per variant: which flags are on. "full" = every part; "plain" = no patch at all.
VARIANTS = {
    "full": dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, IS_LAYER=True, HAS_PATCH=True,
                 HAS_INDEX=True, HAS_LOWRANK=True, HAS_SHIFT=True, HAS_GATE=True, COUNT_FIRES=True,
                 HAS_ACT=True),
    "plain": dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=False, IS_LAYER=False, HAS_PATCH=False,
                  HAS_INDEX=False, HAS_LOWRANK=False, HAS_SHIFT=False, HAS_GATE=False, COUNT_FIRES=False,
                  HAS_ACT=False),
}

POINTERS = ("x_ptr", "res_ptr", "w_ptr", "b_ptr", "out_ptr", "res_out_ptr", "down_ptr", "down_bias_ptr",
            "up_ptr", "shift_ptr", "gate_dir_ptr", "gate_thr_ptr", "gate_mode_ptr", "act_thr_ptr", "index_ptr",
            "fire_ptr")


BANK_POINTERS = ("down_ptr", "down_bias_ptr", "up_ptr", "shift_ptr", "gate_dir_ptr")


def selects(config, mix: str, variant: str) -> bool:
    """Whether the dispatcher can pick ``config`` for this activations/bank mix and variant:
    fp32-dot tiles run only with fp32 banks, 16-bit-dot tiles only with 16-bit ones; the tile
    kernel exists only with a low-rank part; an unpatched call has no bank, so one mix covers it."""
    act, bank = mix.split("/")
    if not VARIANTS[variant]["HAS_PATCH"]:
        return config.kernel == "row" and bank == act
    if config.kernel == "tile":
        return config.DOT_FP32 == (bank == "fp32")
    return True


def _signature(kernel: str, dtype: str, bank: str) -> dict:
    """Argument types: activations and weight in ``dtype``, bank in ``bank``, int32 index."""
    pointer_types = {p: f"*{bank if p in BANK_POINTERS else dtype}" for p in POINTERS}
    pointer_types.update(gate_thr_ptr="*fp32", gate_mode_ptr="*i32", act_thr_ptr="*fp32", index_ptr="*i32",
                         fire_ptr="*i32")
    if kernel == "row":
        scalars = {"D": "i32", "rank": "i32", "num_patches": "i32", "eps": "fp32", "weight_offset": "fp32"}
    else:
        scalars = {"N": "i32", "D": "i32", "rank": "i32", "num_patches": "i32", "eps": "fp32",
                   "weight_offset": "fp32"}
    return {**pointer_types, **scalars}


def _attrs(fn, signature: dict, spec: str) -> dict:
    """The JIT's divisibility specialisation as ASTSource attrs: {(arg index,): [["tt.divisibility", 16]]}."""
    if spec == "none":
        return {}
    names = [n for n, t in signature.items() if t.startswith("*") or n in DIVISIBLE_INTS]
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def jobs(variants, mixes):
    """(config, variant, mix) for every dispatcher config and each mix that can select it."""
    for config in dispatch.all_configs():
        for variant in variants:
            for mix in mixes:
                if selects(config, mix, variant):
                    yield config, variant, mix


def _cuobjdump() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else "cuobjdump"


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(name)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key] = int(m.group(1)) if m else None
    return usage


def compile_one(job) -> dict:
    """Compile one (config, variant, mix, arch, spec); returns a result row (error text on failure)."""
    config, variant, mix, arch, spec = job
    dtype, bank = mix.split("/")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastpatch.kernels.triton_ops import fused_add_norm as k

    fn = k.KERNELS[config.kernel]
    constexprs = dict(VARIANTS[variant])
    if config.kernel == "tile":
        for flag in ("HAS_PATCH", "HAS_LOWRANK"):
            constexprs.pop(flag)
    constexprs.update(config.constexprs())
    signature = _signature(config.kernel, dtype, bank)
    attrs = _attrs(fn, signature, spec)
    signature.update({name: "constexpr" for name in constexprs})
    row = dict(kernel=config.kernel, config=config.label(), variant=variant, dtype=dtype, bank_dtype=bank,
               spec=spec, arch=f"sm_{arch}", num_warps=config.num_warps)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps})
        row.update(_resource_usage(compiled.asm["cubin"]))
        row["error"] = None
    except Exception as exc:  # reported, and makes the exit status non-zero
        row.update(REG=None, STACK=None, SHARED=None, LOCAL=None, error=f"{type(exc).__name__}: {exc}"[:500])
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def markdown(rows) -> str:
    lines = ["| kernel | config | variant | act/bank | spec | arch | REG | STACK | SHARED | LOCAL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['kernel']} | {r['config']} | {r['variant']} | {r['dtype']}/{r['bank_dtype']} | {r['spec']} | "
                f"{r['arch']} |")
        if r["error"]:
            lines.append(f"{head} compile error: {r['error'][:80]} | | | |")
        else:
            lines.append(f"{head} {r['REG']} | {r['STACK']} | {r['SHARED']} | {r['LOCAL']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--mixes", nargs="+", default=["bf16/bf16", "bf16/fp32"], choices=list(MIXES),
                    help="activations/bank dtype pairs (default: bf16 with a bf16 and with an fp32 bank)")
    ap.add_argument("--dtypes", nargs="+", choices=list(TYPE_NAMES),
                    help="shorthand: these activation dtypes, each with a bank in its own dtype and in fp32")
    ap.add_argument("--spec", nargs="+", default=["jit"], choices=["jit", "none"])
    ap.add_argument("--kernels", nargs="+", default=["row", "tile"], choices=["row", "tile"])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    mixes = args.mixes
    if args.dtypes:
        mixes = sorted({f"{d}/{b}" for d in args.dtypes for b in (d, "fp32")})
    work = [(c, v, m, a, sp) for (c, v, m) in jobs(args.variants, mixes) if c.kernel in args.kernels
            for a in args.arch for sp in args.spec]
    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(compile_one, work))
    else:
        rows = [compile_one(j) for j in work]
    elapsed = time.perf_counter() - start

    header = (f"{'kernel':6} {'config':64} {'variant':7} {'act/bank':9} {'spec':4} {'arch':5} {'REG':>4} "
              f"{'STACK':>5} {'SHARED':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        head = (f"{r['kernel']:6} {r['config']:64} {r['variant']:7} {r['dtype'] + '/' + r['bank_dtype']:9} "
                f"{r['spec']:4} {r['arch']:5}")
        if r["error"]:
            print(f"{head} ERROR {r['error']}")
        else:
            print(f"{head} {r['REG']:>4} {r['STACK']:>5} {r['SHARED']:>6}")
    errors = [r for r in rows if r["error"]]
    spills = [r for r in rows if not r["error"] and (r["STACK"] or 0) > 0]
    print(f"\n{len(rows)} compiles in {elapsed:.1f} s: {len(errors)} errors, {len(spills)} with STACK > 0")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows))
    if args.json:
        import triton
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(triton=triton.__version__, rows=rows), indent=1))
    return 1 if errors or spills else 0


if __name__ == "__main__":
    sys.exit(main())
