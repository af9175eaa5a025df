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

All variants share the one model (patches applied before and removed after each timed forward,
the unpatched output checked to come back bit-for-bit), so a model that fits once can be benched.
Variants are timed round-robin and ratios are medians of paired samples. Prints a table and
writes bench.json, bench.md and bench.png (a plot of the ratios; needs matplotlib:
pip install 'fastpatch[plot]') to --out.

example:
  fastpatch bench
  fastpatch bench --layers 4 --hidden 256 --new-tokens 16 --out /tmp/bench
  fastpatch bench --device cuda --dtype bfloat16 --batch 32
  fastpatch bench --model ./my-hf-model --device cuda --variants hf_eager fastpatch_steer
"""


def add_arguments(p) -> None:
    from .common import add_progress_argument

    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="a local Hugging Face folder, a hub id or 'smollm2' (default: the built-in Llama config)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the built-in model (default 512)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the built-in model (default 8)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    p.add_argument("--intermediate", type=int, default=1408, help="MLP width (default 1408)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if present)")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", default=None, help="fastpatch backend (default: fastest for the device)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="decoded tokens, each one paired sample (default 128)")
    p.add_argument("--repeats", type=int, default=7, help="prefill repeats per variant (default 7)")
    p.add_argument("--rank", type=int, default=16, help="rank of the low-rank variant (default 16)")
    p.add_argument("--bank-size", type=int, default=8, help="patches in the bank variant (default 8)")
    p.add_argument("--variants", nargs="*", default=[], help="only these variants (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="fastpatch-bench", help="folder for bench.json/.md/.png (default ./fastpatch-bench)")
    add_progress_argument(p)


def run(args) -> int:
    import sys

    import torch

    from ..model_bench import PLOT_INSTALL, BenchConfig, format_table, run_bench, write_results
    from .common import show_progress

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      intermediate=args.intermediate, vocab=args.vocab, batch=args.batch,
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                      rank=args.rank, bank_size=args.bank_size, device=args.device, dtype=args.dtype,
                      backend=args.backend, model=args.model, variants=list(args.variants))
    cfg.resolved_device()  # a bad or absent --device fails here, before the model is built
    result = run_bench(cfg, progress=show_progress(args))
    print(format_table(result))
    paths = write_results(result, args.out)
    print(f"\nwrote {', '.join(p for p in paths.values() if p)}")
    if paths["png"] is None:
        print(f"bench.png skipped: matplotlib is not installed; {PLOT_INSTALL} to get the plot", file=sys.stderr)
    return 0
