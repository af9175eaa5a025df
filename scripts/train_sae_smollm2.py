"""Train a small SAELens-format SAE on SmolLM2-135M's residual stream, on CPU, in a few minutes.

SAELens' own trainer streams a hub data set; this machine has none, so the loop is written here: the
activations of ``layers.LAYER.resid_post`` on local English text (this repository's README and docs),
then a ReLU SAE (SAELens ``StandardSAE``) trained with Adam on MSE + λ·Σ f_i·‖d_i‖ (SAELens' standard L1
loss), decoder rows renormalised to unit norm. The result is written with SAELens' ``save_model`` (cfg.json
+ sae_weights.safetensors) in float16, which keeps it under 3 MB at d_sae 1024.

    python scripts/train_sae_smollm2.py --out FOLDER [--layer 12 --d-sae 1024 --steps 1500]

(default FOLDER: the docs folder's assets/smollm2-sae-l12, where the SAE walkthrough reads it)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def corpus() -> list[str]:
    """Local English text: the README and docs/*.md, cut into paragraphs of 40+ characters."""
    texts = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for para in path.read_text().split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= 40:
                texts.append(para)
    return texts


@torch.no_grad()
def activations(model, tok, texts, layer: int, max_len: int = 128) -> torch.Tensor:
    """h at layers.{layer}.resid_post of every token but the first, [N, D] float32; the model stops there.

    SmolLM2's tokenizer adds no BOS: position 0 is a text token that acts as the attention sink (its
    residual stream is far larger than the other positions'), left out as a BOS would be."""
    rows, got = [], {}

    class Stop(Exception):
        pass

    def stop(module, args, out):  # decoder layer `layer`'s output is layers.{layer}.resid_post
        got["h"] = out[0] if isinstance(out, tuple) else out
        raise Stop

    handle = model.model.layers[layer].register_forward_hook(stop)  # the layers after it never run
    try:
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"][:, :max_len]
            try:
                model(input_ids=ids)
            except Stop:
                pass
            rows.append(got.pop("h")[0, 1:].float())
    finally:
        handle.remove()
    return torch.cat(rows)


def train(h: torch.Tensor, d_sae: int, steps: int, l1: float, lr: float, batch: int, seed: int, log):
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    D = h.shape[1]
    cfg = sl.StandardSAEConfig(d_in=D, d_sae=d_sae, apply_b_dec_to_input=True, dtype="float32",
                               metadata=SAEMetadata(hook_name="", model_name="SmolLM2-135M"))
    sae = sl.StandardSAE(cfg)
    with torch.no_grad():  # decoder rows unit norm, encoder its transpose, b_dec the data's median-ish mean
        W = torch.randn(d_sae, D)
        W /= W.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(h.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    scale = float(h.norm(dim=-1).mean())  # the L1 term is per unit of input norm
    for step in range(steps):
        x = h[torch.randint(0, h.shape[0], (batch,))]
        f = sae.encode(x)
        rec = sae.decode(f)
        mse = (rec - x).pow(2).sum(-1).mean() / scale**2
        sparsity = (f * sae.W_dec.norm(dim=-1)).sum(-1).mean() / scale
        loss = mse + l1 * sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            with torch.no_grad():
                l0 = float((f > 0).float().sum(-1).mean())
                ev = 1 - float((rec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
            log(f"step {step:5d}  loss {float(loss.detach()):.4f}  mse {float(mse.detach()):.4f}  L0 {l0:.1f}  "
                f"explained variance {ev:.3f}")
    return sae


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "assets" / "smollm2-sae-l12"))
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--l1", type=float, default=0.15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paragraphs", type=int, default=120, help="how many of the corpus' paragraphs (evenly spaced)")
    ap.add_argument("--max-len", type=int, default=96, help="tokens per paragraph at most")
    ap.add_argument("--cache", default=None, help="keep the collected activations in this .pt file (reused if there)")
    args = ap.parse_args(argv)

    from fastpatch.app.models import load_model

    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    model, tok = load_model("smollm2")
    texts = corpus()
    texts = texts[::max(1, len(texts) // args.paragraphs)][:args.paragraphs]
    if args.cache and Path(args.cache).exists():
        h = torch.load(args.cache)
    else:
        h = activations(model, tok, texts, args.layer, args.max_len)
        if args.cache:
            torch.save(h, args.cache)
    log(f"{len(texts)} paragraphs, {h.shape[0]} tokens of layers.{args.layer}.resid_post (hidden {h.shape[1]})")
    sae = train(h, args.d_sae, args.steps, args.l1, args.lr, args.batch, args.seed, log)
    sae.cfg.metadata.hook_name = f"blocks.{args.layer}.hook_resid_post"
    sae.cfg.dtype = "float16"
    sae = sae.to(torch.float16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sae.save_model(out)
    with torch.no_grad():
        f = sae.to(torch.float32).encode(h)
        rec = sae.decode(f)
    alive = int((f > 0).any(0).sum())
    mse = float((rec - h).pow(2).sum(-1).mean() / h.norm(dim=-1).pow(2).mean())
    ev = 1 - float((rec - h).pow(2).sum() / (h - h.mean(0)).pow(2).sum())
    info = {"layer": args.layer, "d_sae": args.d_sae, "tokens": int(h.shape[0]), "steps": args.steps,
            "l1": args.l1, "L0": round(float((f > 0).float().sum(-1).mean()), 1), "alive_features": alive,
            "relative_mse": round(mse, 4), "explained_variance": round(ev, 3), "paragraphs": len(texts),
            "seconds": round(time.time() - t0, 1)}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"saved {out}: {json.dumps(info)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
