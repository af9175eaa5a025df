"""The outputs of the SAE walkthrough doc: SmolLM2-135M with the SAE scripts/train_sae_smollm2.py writes
(by default into the docs folder's assets/smollm2-sae-l12).

Finds features with ``sae.top``, clamps one, generates with and without the clamp, saves the clamp as a patch
file and runs ``fastpatch eval`` on it; then starts an in-process vLLM engine (CPU, float32, eager) that serves
the SAE per request and generates one clamped and one plain request in one batch, checking both against the
Hugging Face generations above. Prints what the doc shows; re-run it after retraining the SAE.

    python scripts/sae_walkthrough.py [--feature N] [--value 8.0] [--no-vllm]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# vLLM reads these when it is imported / when an engine starts (as tests/integrations/vllm/vllm_common.py)
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parent.parent
SAE_DIR = ROOT / "docs" / "assets" / "smollm2-sae-l12"
PROMPT = "The GPU kernel fuses the residual add and the norm, so the patch costs almost nothing."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--token", default=" GPU", help="clamp the feature most active on this token of PROMPT")
    ap.add_argument("--feature", type=int, default=None, help="the feature to clamp (overrides --token)")
    ap.add_argument("--value", type=float, default=None, help="clamp value (default: 4x its max on the prompt)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM step")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # vLLM's CPU worker wants one torch thread; the HF steps use the same

    import fastpatch as fp
    from fastpatch.app.models import load_model

    model, tok = load_model("smollm2")
    sae = fp.sae.load(SAE_DIR)
    print(f">>> sae = fp.sae.load({str(SAE_DIR.relative_to(ROOT))!r})\n{sae}")

    top = sae.top(model, tok, PROMPT, k=3)
    print(">>> sae.top(model, tok, PROMPT, k=3)")
    for token, feats in top:
        print(f"{token!r:14s} " + "  ".join(f"{i}:{v:.2f}" for i, v in feats))
    toks = [t for t, _ in top]
    if args.feature is not None:
        feature = args.feature
    elif args.token in toks:
        feature = top[toks.index(args.token)][1][0][0]
    else:
        raise SystemExit(f"--token {args.token!r} is not a token of the prompt; its tokens: {toks}")
    peak = max((v for _, feats in top[1:] for i, v in feats if i == feature), default=1.0)
    value = args.value if args.value is not None else round(4 * peak, 1)
    print(f"# clamping feature {feature} (the top feature on {args.token!r}, max {peak:.2f} after position 0) "
          f"to {value}")

    prompt = "My favourite thing about the weekend is"
    ids = tok(prompt, return_tensors="pt")["input_ids"]

    def generate():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=30, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    hf_plain = generate()
    print(f">>> generate({prompt!r})  # unpatched\n{tok.decode(hf_plain, skip_special_tokens=True)!r}")
    patch = {sae.site: sae.clamp({feature: value})}
    with fp.apply(model, patch):
        hf_clamped = generate()
    print(f">>> with fp.apply(model, {{sae.site: sae.clamp({{{feature}: {value}}})}}): generate(...)\n"
          f"{tok.decode(hf_clamped, skip_special_tokens=True)!r}")
    # what the SAE reads at the site before and after the patch: the clamp puts value·d_i where f_i(h)·d_i was;
    # re-encoding reads f_i + (value − f_i)·(e_i·d_i), which is value only when e_i·d_i = 1
    with fp.hooks.record(model, [sae.site]) as acts, torch.no_grad():
        model(ids)
    before = sae.encode(acts[sae.site][0])[:, feature]
    with fp.hooks.apply(model, patch), fp.hooks.record(model, [sae.site]) as acts, torch.no_grad():
        model(ids)
    after = sae.encode(acts[sae.site][0])[:, feature]
    ed = float(sae.W_enc[:, feature] @ sae.W_dec[feature])
    print(f"# feature {feature} at {sae.site} per token of {prompt!r}, e_i·d_i = {ed:.3f}\n"
          f"#   unpatched {[round(float(v), 1) for v in before]}\n"
          f"#   patched   {[round(float(v), 1) for v in after]}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"clamp{feature}.safetensors"
        fp.save(patch, path, model=model)
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
    if args.no_vllm:
        return 0
    return serve(prompt, feature, value, hf_clamped, hf_plain, tok)


def serve(prompt, feature, value, hf_clamped, hf_plain, tok) -> int:
    """The SAE served per request by an in-process vLLM engine: one clamped and one plain request, one batch."""
    from vllm import LLM, SamplingParams

    from fastpatch.app.models import smollm2_checkpoint

    folder = str(SAE_DIR.relative_to(ROOT)) if Path.cwd() == ROOT else str(SAE_DIR)
    print(f">>> llm = LLM(model=SMOLLM2_FOLDER, dtype='float32', enforce_eager=True, additional_config="
          f"{{'fastpatch': {{'saes': {{'smollm2-l12': {folder!r}}}}}}})")
    llm = LLM(model=str(smollm2_checkpoint()), dtype="float32", enforce_eager=True, max_model_len=256,
              max_num_seqs=4, seed=0, additional_config={"fastpatch": {"saes": {"smollm2-l12": str(SAE_DIR)}}})
    section = {"sae": "smollm2-l12", "clamp": {str(feature): value}}
    clamped = SamplingParams(max_tokens=30, temperature=0.0, extra_args={"fastpatch": section})
    plain = SamplingParams(max_tokens=30, temperature=0.0)
    outs = llm.generate([prompt, prompt], [clamped, plain], use_tqdm=False)
    print(f">>> llm.generate([prompt] * 2, [clamped, plain])  # clamped: extra_args={{'fastpatch': {section}}}")
    ok = True
    for name, out, hf in (("clamped", outs[0], hf_clamped), ("plain", outs[1], hf_plain)):
        got = list(out.outputs[0].token_ids)
        n = min(len(got), len(hf))
        same = got[:n] == hf[:n]
        ok &= same
        print(f"{name:8s} {out.outputs[0].text!r}\n         same {n} tokens as Hugging Face"
              f"{' + fastpatch.apply' if name == 'clamped' else ''}: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
