"""`fastpatch bench`: prefill and decode latency of HF eager, hooks and fused patches."""
from __future__ import annotations

NAME = "bench"
HELP = "time HF eager vs forward hooks vs fused fastpatch patches on a model"
DESCRIPTION = """\
Build a model (default: a small Llama-architecture model from a config with random weights,
sized to run in about a minute on 2 CPU cores), make one copy per variant, and time prefill and
decode on the best device present:

  hf_eager                 the unpatched Hugging Face model
  hf_hooks_steer           a steering vector at every layer through forward hooks
  fastpatch_unpatched      fused add + norm at every layer, no patch
  fastpatch_steer          a steering vector at every layer, fused
  fastpatch_lowrank16      a rank-16 low-rank patch at every layer, fused
  fastpatch_gated          a cosine-gated steering vector at every layer, fused
  fastpatch_bank8_mixed    an 8-patch bank at every layer, one patch id per sequence (some none)

Variants are timed round-robin and ratios are medians of paired samples. Prints a table and
writes bench.json, bench.md and bench.png (a plot of the ratios) to --out.

example:
  fastpatch bench
  fastpatch bench --layers 4 --hidden 256 --new-tokens 16 --out /tmp/bench
  fastpatch bench --device cuda --dtype bf16 --batch 32
"""


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face model folder (default: built-in Llama config)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the built-in model (default 512)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the built-in model (default 8)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    p.add_argument("--intermediate", type=int, default=1408, help="MLP width (default 1408)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model dtype (default: fp32 on CPU, bf16 on CUDA)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch

    from ..model_bench import BenchConfig, format_table, run_bench, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      intermediate=args.intermediate, vocab=args.vocab, batch=args.batch,
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                      rank=args.rank, bank_size=args.bank_size, device=args.device, dtype=args.dtype,
                      backend=args.backend, model=args.model, variants=list(args.variants))
    if cfg.resolved_device().type == "cuda" and not torch.cuda.is_available():
        print("fastpatch bench: --device cuda asked for, but no CUDA GPU is present")
        return 2
    result = run_bench(cfg, progress=not args.no_progress)
    print(format_table(result))
    paths = write_results(result, args.out)
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0
