"""Validating a patch: does it move what it should, and leave everything else alone?

For a patch mapping ({site: patch}) and two prompt sets:

- **target prompts**: the effect on the target metric, patched minus unpatched. The metric is either
  ``"projection"``, the mean projection of the residual stream at ``read_site`` on a unit direction
  (default: the patch's own direction, read after the patch at the patched layer's ``resid_post``),
  or ``"logprob"``, the mean log-probability of given continuations after each prompt.
- **neutral prompts**: the KL divergence KL(unpatched ‖ patched) of the next-token distribution at
  every real token position (padding excluded), and how often the top-1 token stays the same.

``evaluate(...)`` returns an :class:`EvalReport` with ``.table()`` and ``.to_json()``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from .fitting import pad_batch, pad_token_id, pool, tokenize
from ..core.patches import to_canonical

METRICS = ("projection", "logprob")


def patch_direction(patch) -> torch.Tensor:
    """The direction a patch acts along (unit, float64): a steer's shift, else its first ``up`` row."""
    c = to_canonical(patch)
    v = c.shift if bool((c.shift != 0).any()) or c.rank == 0 else c.up[0]
    n = float(v.norm())
    if n == 0.0:
        raise ValueError("the patch has no direction (all zero); pass direction=")
    return v / n


def _layer_of(site: str) -> int:
    try:
        return int(site.split(".")[1])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"cannot read a layer from site {site!r}") from exc


def default_read_site(patches: dict) -> str:
    """resid_post of the deepest patched layer: after every patch, whatever the implementation."""
    return f"layers.{max(_layer_of(s) for s in patches)}.resid_post"


@dataclass
class EvalReport:
    metric: str
    read_site: Optional[str]
    target_unpatched: float
    target_patched: float
    effect: float  # patched − unpatched
    effect_in_sd: float  # effect / std of the unpatched per-prompt metric (0 if that std is 0)
    kl_mean: float  # mean over real positions of neutral prompts
    kl_last: float  # mean at the last real position of each neutral prompt
    kl_max: float  # the largest per-prompt mean KL
    top1_agreement: float  # fraction of neutral positions whose argmax token is unchanged
    num_target: int
    num_neutral: int
    per_prompt_kl: list = field(default_factory=list)

    def to_json(self, **kw) -> str:
        return json.dumps(asdict(self), **kw)

    def table(self) -> str:
        what = (f"mean projection at {self.read_site}" if self.metric == "projection"
                else "mean log-prob of continuations")
        rows = [
            ("target metric", what),
            ("  unpatched", f"{self.target_unpatched:+.4f}"),
            ("  patched", f"{self.target_patched:+.4f}"),
            ("  effect", f"{self.effect:+.4f}  ({self.effect_in_sd:+.2f} sd of unpatched)"),
            (f"neutral KL(unpatched‖patched), {self.num_neutral} prompts", ""),
            ("  mean over tokens", f"{self.kl_mean:.5f} nats"),
            ("  last token", f"{self.kl_last:.5f} nats"),
            ("  worst prompt", f"{self.kl_max:.5f} nats"),
            ("  top-1 token unchanged", f"{100 * self.top1_agreement:.1f}%"),
        ]
        w = max(len(a) for a, _ in rows)
        return "\n".join(f"{a:<{w}}  {b}".rstrip() for a, b in rows)


def _batches(tokens, batch_size):
    for start in range(0, len(tokens), batch_size):
        yield tokens[start:start + batch_size]


def _projections(model, tokens, pad_id, read_site, u, position, batch_size, device) -> torch.Tensor:
    from ..integrations.hf.hooks import record

    out = []
    for chunk in _batches(tokens, batch_size):
        ids, mask = pad_batch(chunk, pad_id, device)
        with record(model, [read_site]) as acts:
            model(input_ids=ids, attention_mask=mask)
        out.append(pool(acts[read_site], mask, position).double().cpu() @ u)
    return torch.cat(out)


def _continuation_logprobs(model, prompt_tokens, cont_tokens, pad_id, batch_size, device) -> torch.Tensor:
    """Per prompt: the mean over continuations of the summed log-prob of the continuation tokens."""
    seqs, spans = [], []
    for p in prompt_tokens:
        for c in cont_tokens:
            seqs.append(p + c)
            spans.append((len(p), len(p) + len(c)))
    scores = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        ids, mask = pad_batch(chunk, pad_id, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
        for b, (lo, hi) in enumerate(spans[start:start + batch_size]):
            # token at position t is predicted by the logits at t − 1
            tgt = ids[b, lo:hi]
            scores.append(float(logp[b, lo - 1:hi - 1].gather(-1, tgt.unsqueeze(-1)).sum()))
    return torch.tensor(scores, dtype=torch.float64).view(len(prompt_tokens), len(cont_tokens)).mean(1)


def _logits(model, tokens, pad_id, batch_size, device):
    for chunk in _batches(tokens, batch_size):
        ids, mask = pad_batch(chunk, pad_id, device)
        yield model(input_ids=ids, attention_mask=mask).logits.double().cpu(), mask.cpu()


def evaluate(model, tokenizer, patches: dict, target_prompts: Sequence, neutral_prompts: Sequence, *,
             metric: str = "projection", direction=None, read_site: Optional[str] = None,
             continuations: Optional[Sequence] = None, position: str = "last", batch_size: int = 8,
             backend: Optional[str] = None, progress: bool = False) -> EvalReport:
    """Effect of ``patches`` on target prompts and its side effects on neutral prompts.

    ``patches`` is {site: patch} (one patch per site; what :func:`fastpatch.apply` takes). The model
    is patched with :func:`fastpatch.apply` (the hooks implementation for architectures without a
    fused one) and unpatched again before returning. Prompts are strings or token id lists.

    ``read_site`` should be a ``resid_post`` (or ``resid_pre``) site: with the fused implementation a
    recorded ``resid_mid`` is the value before that site's own patch (see :func:`fastpatch.hooks.record`).
    """
    from tqdm.auto import tqdm

    from ..integrations.hf import apply

    if not isinstance(patches, dict) or not patches:
        raise ValueError("patches must be a non-empty {site: patch} dict")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "logprob" and not continuations:
        raise ValueError("metric='logprob' needs continuations=[...] (text scored after each target prompt)")
    targets, neutrals = tokenize(tokenizer, target_prompts), tokenize(tokenizer, neutral_prompts)
    if not targets or not neutrals:
        raise ValueError("evaluate() needs at least one target prompt and one neutral prompt")
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    live = {s: p for s, p in patches.items() if p is not None}

    u = None
    if metric == "projection":
        read_site = read_site or default_read_site(live)
        if direction is None:
            if len(live) != 1:
                raise ValueError("several patches: pass direction= for the projection metric")
            direction = patch_direction(next(iter(live.values())))
        u = torch.as_tensor(direction).to(torch.float64).cpu()
        u = u / u.norm()
    else:
        conts = []
        for c in continuations:
            if isinstance(c, str):
                if tokenizer is None:
                    raise ValueError("string continuations need a tokenizer")
                conts.append(tokenizer(c, add_special_tokens=False)["input_ids"])
            else:
                conts.append([int(t) for t in c])

    def target_metric():
        if metric == "projection":
            return _projections(model, targets, pad_id, read_site, u, position, batch_size, device)
        return _continuation_logprobs(model, targets, conts, pad_id, batch_size, device)

    bar = tqdm(total=4, desc="evaluating", disable=not progress, leave=False)
    with torch.no_grad():
        before = target_metric()
        bar.update()
        ref = list(_logits(model, neutrals, pad_id, batch_size, device))
        bar.update()
        handle = apply(model, live, backend=backend, fallback="hooks")
        try:
            after = target_metric()
            bar.update()
            new = [lg for lg, _ in _logits(model, neutrals, pad_id, batch_size, device)]
            bar.update()
        finally:
            handle.remove()
            bar.close()

    kl_sum = kl_n = agree = 0.0
    per_prompt, last = [], []
    for (p_logits, mask), q_logits in zip(ref, new):
        logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # [B, S]
        m = mask.bool()
        kl_sum += float(kl[m].sum())
        kl_n += int(m.sum())
        agree += float((p_logits.argmax(-1) == q_logits.argmax(-1))[m].sum())
        per_prompt += (kl * m).sum(1).div(m.sum(1)).tolist()
        last += pool(kl.unsqueeze(-1), mask, "last").squeeze(-1).tolist()
    sd = float(before.std()) if before.numel() > 1 else 0.0
    effect = float(after.mean() - before.mean())
    return EvalReport(
        metric=metric, read_site=read_site, target_unpatched=float(before.mean()),
        target_patched=float(after.mean()), effect=effect,
        effect_in_sd=effect / sd if sd > 0 and math.isfinite(sd) else 0.0,
        kl_mean=kl_sum / kl_n, kl_last=sum(last) / len(last), kl_max=max(per_prompt),
        top1_agreement=agree / kl_n, num_target=len(targets), num_neutral=len(neutrals),
        per_prompt_kl=per_prompt,
    )
