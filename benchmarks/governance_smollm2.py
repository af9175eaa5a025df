"""The whole governed flow on SmolLM2-135M-Instruct (CPU): fit → evaluate → publish → 10% canary → alert →
promote → expire. Prints what docs/lifecycle.md shows ("Governance on SmolLM2"); run it to reproduce:

    python benchmarks/governance_smollm2.py [--store DIR] > benchmarks/results/governance_smollm2.txt
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch

SITE = "layers.8.resid_post"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None, help="registry store directory (default: a fresh temp dir)")
    ap.add_argument("--requests", type=int, default=80, help="requests per phase")
    ap.add_argument("--bad-scale", type=float, default=3.0)
    ap.add_argument("--good-scale", type=float, default=1.1)
    args = ap.parse_args(argv)

    import fastpatch
    from fastpatch.app.models import load_model
    from fastpatch.app.sentiment_demo import chat, load_prompts
    from fastpatch.lifecycle import Governance, PolicyViolation, Serving, SQLiteStore
    from fastpatch.lifecycle.evaluation import evaluate
    from fastpatch.lifecycle.fitting import fit
    from fastpatch.lifecycle.telemetry import Detector, prometheus

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    data = load_prompts()
    print(f"== fit ({len(data['pairs'])} prompt pairs)")
    res = fit(model, tok, data["pairs"], SITE, "mean_diff", scale=1.0, progress=False)
    print(res.summary())
    v = res.patch.v.to(torch.float64)
    steer = lambda scale: {SITE: fastpatch.Steer(v, scale)}  # noqa: E731

    print("\n== evaluate 1.0.0 (scale 1.0)")
    report = evaluate(model, tok, steer(1.0), data["targets"], data["neutral"], metric="logprob",
                      continuations=data["continuations"])
    print(report.table())

    # The outcome metric the operator reports per request: the patch's effect, i.e. the projection of the
    # last token's residual stream after layer 8 on the patch direction (read with a plain forward hook).
    u = (v / v.norm()).float()
    seen = {}
    model.model.layers[8].register_forward_hook(
        lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))

    def effect():
        return float(seen["h"][0, -1] @ u)

    prompts = [torch.tensor([tok(p).input_ids]) for p in data["targets"] + data["neutral"]]

    def validation(scale):
        with fastpatch.patched(model, steer(scale)), torch.no_grad():
            out = []
            for ids in prompts:
                model(ids)
                out.append(effect())
            return out

    base = validation(1.0)
    mu = sum(base) / len(base)
    sd = math.sqrt(sum((x - mu) ** 2 for x in base) / (len(base) - 1))
    band = [mu - 3 * sd, mu + 3 * sd]
    print(f"\nvalidation band for 'effect' (1.0.0 on {len(base)} prompts: mean {mu:.2f} ± 3 sd {sd:.2f}): "
          f"[{band[0]:.2f}, {band[1]:.2f}]")

    store_dir = args.store or tempfile.mkdtemp(prefix="fastpatch-registry-")
    gov = Governance(SQLiteStore(store_dir), actor="alice", detector=Detector(window=5))
    print(f"\n== publish (store {store_dir}: SQLite WAL + content-addressed patch files)")
    gov.create_set("tone", policy={"regions": ["eu", "us"], "sites": ["layers.8.*"], "max_edit_norm": 60.0})
    try:
        gov.publish("tone", "0.9.0", {"positive": steer(args.bad_scale)})
    except PolicyViolation as exc:
        print("refused:", exc)
    for version, scale in (("1.0.0", 1.0), ("1.1.0", 1.9)):
        rec = gov.publish("tone", version, {"positive": steer(scale)}, note=f"scale {scale}")
        print(f"published tone@{version} (scale {scale}) {rec['content_hash'][:23]}…")
    gov.activate("tone", "1.0.0")
    gov.set_guard("tone", "pause", bands={"effect": band})
    serving = Serving(gov, model, poll_interval=0)

    def traffic(phase, n):
        arms = {}
        for i in range(n):
            ids = prompts[i % len(prompts)]
            with serving.request("tone", key=f"user-{phase}-{i}", labels={"region": "eu"}) as s, torch.no_grad():
                model(ids)
                value = effect()
                s.add_rows(ids.shape[1])
            arms[(s.choice.arm, s.version)] = arms.get((s.choice.arm, s.version), 0) + 1
            alert = serving.report(s, "effect", value)
            if alert:
                print(f"  request {i}: ALERT {alert['name']}@{alert['version']} arm={alert['arm']} "
                      f"effect window mean {alert['window_mean']:.2f} outside "
                      f"[{alert['band'][0]:.2f}, {alert['band'][1]:.2f}] -> guard: {alert['guard']}")
        print("  served:", ", ".join(f"{arm} {ver}: {k}" for (arm, ver), k in sorted(arms.items())))

    def say(key, region="eu"):
        q = "Tell me about your weekend."
        ids = torch.tensor([tok(chat(tok, q)).input_ids])
        with serving.request("tone", key=key, labels={"region": region}) as s, torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
            s.add_rows(out.shape[1] - 1)  # prompt rows + decode steps (the last token is never run)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")
        print(f"  {key} [{s.choice.label} {s.choice.arm}{' - ' + s.choice.reason if s.choice.reason else ''}]: "
              f"{text}")

    print("\n== 10% canary of 1.1.0 (scale 1.9)")
    gov.canary("tone", "1.1.0", 10)
    canary_key = next(f"user-{i}" for i in range(1000)
                      if gov.resolve("tone", key=f"user-{i}", labels={"region": "eu"}).arm == "canary")
    control_key = next(f"user-{i}" for i in range(1000)
                       if gov.resolve("tone", key=f"user-{i}", labels={"region": "eu"}).arm == "control")
    say(control_key)
    say(canary_key)
    say(canary_key, region="apac")
    traffic("a", args.requests)
    print("  rollout now:", json.dumps({k: gov.show("tone")["rollout"][k] for k in ("stable", "arms", "paused")}))

    print("\n== abort, publish 1.2.0 (scale %.1f), 10%% canary, promote" % args.good_scale)
    gov.abort("tone", reason="effect out of band")
    gov.publish("tone", "1.2.0", {"positive": steer(args.good_scale)}, note=f"scale {args.good_scale}")
    gov.canary("tone", "1.2.0", 10)
    traffic("b", args.requests)
    gov.promote("tone")
    say(canary_key)
    serving.flush()

    print("\n== expire 1.2.0")
    gov.expire("tone", "1.2.0", at=time.time() + 0.5)
    time.sleep(0.6)
    say(canary_key)
    for rec in gov.versions("tone"):
        print(f"  tone@{rec['version']:<6} {rec['status']:<10} {rec['note']}")

    print("\n== alerts")
    for a in gov.alerts():
        print(f"  {a['name']}@{a['version']} arm={a['arm']} {a['metric']} mean {a['window_mean']:.2f} "
              f"band [{a['band'][0]:.2f}, {a['band'][1]:.2f}] ({a['band_source']}) guard={a['guard']}")
    print("\n== audit")
    for e in gov.audit():
        extra = {k: e[k] for k in ("version", "percent", "arm", "reason", "guard", "metric") if e.get(k) is not None}
        print(f"  {e['id']:>3} {e['actor']:<7} {e['action']:<10} {e['name']:<5} {json.dumps(extra)}")
    print("\n== Prometheus (excerpt)")
    text = prometheus(gov.store.telemetry(), alerts=len(gov.alerts()), generation=gov.store.generation())
    for line in text.splitlines():
        if not line.startswith("#"):
            print("  " + line)
    serving.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
