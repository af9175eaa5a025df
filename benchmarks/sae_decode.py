"""SAE feature clamps at every layer of SmolLM2-135M: decode cost against fastpatch unpatched (issue #17 item 5).

Variants, all on one model (fastpatch.apply with no patches = "unpatched", then one SAE clamp of 1, 8 or 32
features per layer at every ``layers.i.resid_post``, i.e. an ``Encoded`` of that rank in every fused
residual-add + norm). The SAEs are random ReLU SAEs of the trained one's shape (d_sae 1024 on hidden 576);
their cost does not depend on the weights. Timing as in ``fastpatch bench``: each variant keeps its own KV
cache, decode steps run in blocks of ``--block`` per variant per round (apply / remove outside the timed
region), and the ratio is the median over paired steps (step j of a round against step j of the unpatched
block of the same round). The decoded tokens of every variant are printed as a check that the clamps ran.

    python benchmarks/sae_decode.py [--new-tokens 96 --batch 1 --json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--ranks", default="1,8,32")
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)

    import fastpatch as fp
    from fastpatch.app.models import load_model
    from transformers import DynamicCache

    model, _ = load_model("smollm2")
    D, L = model.config.hidden_size, model.config.num_hidden_layers
    sites = [f"layers.{i}.resid_post" for i in range(L)]
    g = torch.Generator().manual_seed(0)
    saes = [fp.sae.SAE(torch.randn(D, args.d_sae, generator=g) / D**0.5, torch.randn(args.d_sae, D, generator=g) * 0.05,
                       torch.randn(args.d_sae, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1,
                       architecture="standard", site=s) for s in sites]
    ranks = [int(r) for r in args.ranks.split(",")]
    patches = {"fastpatch_unpatched": {s: None for s in sites}}
    for r in ranks:
        feats = torch.randperm(args.d_sae, generator=g)[:r].tolist()
        patches[f"sae_clamp{r}"] = {s: sae.clamp({i: 2.0 for i in feats}) for s, sae in zip(sites, saes)}
    names = list(patches)

    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(1))
    caches, nxt, masks, tokens, decode = {}, {}, {}, {}, {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # prefill (and the fused blocks' check against transformers, once per variant)
            handle = fp.apply(model, patches[n], backend=args.backend, verify=True)
            caches[n] = DynamicCache()
            masks[n] = torch.ones_like(prompt)
            out = model(input_ids=prompt, attention_mask=masks[n], use_cache=True, past_key_values=caches[n])
            nxt[n] = out.logits[:, -1:].argmax(-1)
            tokens[n] = [nxt[n]]
            handle.remove()
        for start in range(0, args.new_tokens, args.block):
            for n in names:
                handle = fp.apply(model, patches[n], backend=args.backend, verify=False)
                for _ in range(min(args.block, args.new_tokens - start)):
                    masks[n] = torch.cat([masks[n], torch.ones_like(nxt[n])], dim=1)
                    t0 = time.perf_counter()
                    out = model(input_ids=nxt[n], attention_mask=masks[n], use_cache=True, past_key_values=caches[n])
                    decode[n].append(time.perf_counter() - t0)
                    nxt[n] = out.logits[:, -1:].argmax(-1)
                    tokens[n].append(nxt[n])
                handle.remove()
    base = "fastpatch_unpatched"
    rows = {}
    for n in names:
        rows[n] = {"decode_ms_median": round(statistics.median(decode[n]) * 1e3, 3),
                   "ratio_vs_unpatched": round(statistics.median(a / b for a, b in zip(decode[n], decode[base])), 4),
                   "tokens_differ_from_unpatched": bool((torch.cat(tokens[n], 1) != torch.cat(tokens[base], 1)).any())}
    result = {"what": "SmolLM2-135M decode, SAE clamp at every layer (30 sites) vs fastpatch unpatched",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "block": args.block,
              "d_sae": args.d_sae, "backend": args.backend or "auto", "variants": rows}
    print(f"{'variant':22s} {'decode ms (median)':>18s} {'x unpatched':>12s}  tokens differ")
    for n, row in rows.items():
        print(f"{n:22s} {row['decode_ms_median']:18.2f} {row['ratio_vs_unpatched']:12.3f}  "
              f"{row['tokens_differ_from_unpatched']}")
    print(f"load average at the end: {result['load_average_at_end']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
