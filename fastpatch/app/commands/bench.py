"""`fastpatch bench`: prefill and decode latency of HF eager, hooks and fused patches."""
from __future__ import annotations

NAME = "bench"
HELP = "time HF eager vs forward hooks vs fused fastpatch patches on a model"
DESCRIPTION = """\
Build a model (default: a small Llama-architecture model from a config with random weights,
sized to run in about a minute on 2 CPU cores; or --model, a local Hugging Face folder, a hub id
or 'smollm2') and time prefill and decode on the best device present, for each variant:

  hf_eager                 the unpatched Hugging Face model
  hf_hooks_steer           a steering vector at every layer through forward hooks
  fastpatch_unpatched      fused add + norm at every layer, no patch
  fastpatch_steer          a steering vector at every layer, fused
  fastpatch_lowrank16      a rank-16 low-rank patch at every layer, fused
  fastpatch_gated          a cosine-gated steering vector at every layer, fused
  fastpatch_bank8_mixed    an 8-patch bank at every layer, one patch id per sequence (some none)

All variants share the one model (a variant's patches are applied before its timed forwards and
removed after them, and the unpatched output is checked to come back bit-for-bit), so a model that
fits once can be benched. Variants are timed round-robin (each prefill, and each block of
--decode-block decode steps) and ratios are medians of paired samples. Prints a table and
writes bench.json, bench.md and bench.png (a plot of the ratios; needs matplotlib:
pip install 'fastpatch[plot]') to --out.

example:
  fastpatch bench
  fastpatch bench --layers 4 --hidden 256 --new-tokens 16 --out /tmp/bench
  fastpatch bench --device cuda --dtype bfloat16 --batch 32
  fastpatch bench --model ./my-hf-model --device cuda --variants hf_eager fastpatch_steer
"""


def add_arguments(p) -> None:
    from ..model_bench import ARCH_CONFIGS, BenchConfig
    from ..models import DTYPES
    from .common import add_progress_argument

    d = BenchConfig()  # the defaults live there, once

    def number(flag, help_text):
        name = flag.lstrip("-").replace("-", "_")
        default = getattr(d, name)
        p.add_argument(flag, type=type(default), default=default, help=f"{help_text} (default {default})")

    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="a local Hugging Face folder, a hub id or 'smollm2' (default: the built-in Llama config)")
    p.add_argument("--arch", default=d.arch, choices=list(ARCH_CONFIGS),
                   help=f"family of the built-in random-weight model (default {d.arch}; not with --model)")
    number("--hidden", "hidden size of the built-in model")
    number("--layers", "decoder layers of the built-in model")
    number("--heads", "attention heads of the built-in model")
    number("--kv-heads", "key/value heads of the built-in model")
    number("--intermediate", "MLP width of the built-in model")
    number("--vocab", "vocabulary size of the built-in model")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 or auto (default: cuda if present)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", *DTYPES],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", default=None, help="fastpatch backend (default: fastest for the device)")
    number("--batch", "sequences per batch")
    number("--prompt-len", "prompt tokens")
    number("--new-tokens", "decoded tokens, each one paired sample")
    number("--decode-block", "decode steps per variant per round (one patch apply/remove per block)")
    number("--repeats", "prefill repeats per variant")
    number("--rank", "rank of the low-rank variant")
    number("--bank-size", "patches in the bank variant")
    number("--steer-scale", "scale of every steering vector; on a mixture-of-experts model a tiny one (1e-6) keeps "
           "the expert routing unchanged, so the timing is the patch's own cost (checked, in the output)")
    p.add_argument("--variants", nargs="*", default=[], help="only these variants (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="fastpatch-bench",
                   help="folder for bench.json/.md/.png (default ./fastpatch-bench)")
    add_progress_argument(p)


def run(args) -> int:
    import sys
    from dataclasses import fields

    import torch

    from ..model_bench import PLOT_INSTALL, BenchConfig, format_table, run_bench, write_results
    from .common import show_progress

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)})
    cfg.resolved_device()  # a bad or absent --device fails here, before the model is built
    result = run_bench(cfg, progress=show_progress(args))
    print(format_table(result))
    paths = write_results(result, args.out)
    print(f"\nwrote {', '.join(p for p in paths.values() if p)}")
    if paths["png"] is None:
        print(f"bench.png skipped: matplotlib is not installed; {PLOT_INSTALL} to get the plot", file=sys.stderr)
    return 0
