"""The outputs of the SAE walkthrough doc: SmolLM2-135M with the SAE scripts/train_sae_smollm2.py writes
(by default into the docs folder's assets/smollm2-sae-l12).

Finds features with ``sae.top``, clamps one, generates with and without the clamp, saves the clamp as a patch
file and runs ``fastpatch eval`` on it. Prints what the doc shows; re-run it after retraining the SAE.

    python scripts/sae_walkthrough.py [--feature N] [--value 8.0]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAE_DIR = ROOT / "docs" / "assets" / "smollm2-sae-l12"
PROMPT = "The GPU kernel fuses the residual add and the norm, so the patch costs almost nothing."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feature", type=int, default=None, help="the feature to clamp (default: the top one of "
                                                              "the prompt's most frequent top features)")
    ap.add_argument("--value", type=float, default=None, help="clamp value (default: 4x its max on the prompt)")
    args = ap.parse_args(argv)

    import fastpatch as fp
    from fastpatch.app.models import load_model

    model, tok = load_model("smollm2")
    sae = fp.sae.load(SAE_DIR)
    print(f">>> sae = fp.sae.load({str(SAE_DIR.relative_to(ROOT))!r})\n{sae}")

    top = sae.top(model, tok, PROMPT, k=3)
    print(">>> sae.top(model, tok, PROMPT, k=3)")
    for token, feats in top:
        print(f"{token!r:14s} " + "  ".join(f"{i}:{v:.2f}" for i, v in feats))
    counts = Counter(i for _, feats in top for i, _ in feats[:1])
    feature = args.feature if args.feature is not None else counts.most_common(1)[0][0]
    peak = max((v for _, feats in top for i, v in feats if i == feature), default=1.0)
    value = args.value if args.value is not None else round(4 * peak, 1)
    print(f"# clamping feature {feature} (top feature on {counts[feature]} tokens, max {peak:.2f}) to {value}")

    prompt = "My favourite thing about the weekend is"
    ids = tok(prompt, return_tensors="pt")["input_ids"]

    def generate():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=30, do_sample=False)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    print(f">>> generate({prompt!r})  # unpatched\n{generate()!r}")
    patch = {sae.site: sae.clamp({feature: value})}
    with fp.apply(model, patch):
        print(f">>> with fp.apply(model, {{sae.site: sae.clamp({{{feature}: {value}}})}}): generate(...)\n"
              f"{generate()!r}")
    # the clamp moved the feature where the patch is applied: read it back after the patch
    with fp.hooks.apply(model, patch), fp.hooks.record(model, [sae.site]) as acts, torch.no_grad():
        model(ids)
    f = sae.encode(acts[sae.site][0])[:, feature]
    print(f"# feature {feature} at {sae.site} after the patch, per token: {[round(float(v), 2) for v in f]}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"clamp{feature}.safetensors"
        fp.save(patch, path)
        prompts = Path(tmp) / "prompts.json"
        prompts.write_text(json.dumps({
            "targets": ["Our new graphics card has", "The CUDA kernel launch", "Tensor cores on the GPU"],
            "neutral": ["The weather today is", "My grandmother's recipe for soup", "The football match ended"]}))
        cmd = [sys.executable, "-m", "fastpatch", "eval", str(path), "--model", "smollm2", "--prompts", str(prompts)]
        print(f"$ fastpatch eval clamp{feature}.safetensors --model smollm2 --prompts prompts.json")
        run = subprocess.run(cmd, capture_output=True, text=True)
        print(run.stdout.strip())
        if run.returncode:
            print(run.stderr[-2000:], file=sys.stderr)
            return run.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
