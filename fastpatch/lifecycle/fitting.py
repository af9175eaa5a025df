"""Fitting patches from activations: record the residual stream over prompt sets, then build a
steering vector, an ablation direction, a clamp or a low-rank edit from them.

Two layers:

- :func:`collect` records activations at sites over prompts (batched, padding-aware, any device,
  tqdm progress) and pools each prompt to one row: its ``"last"`` real token or the ``"mean"`` over
  its real tokens.
- The maths on [N, D] tensors, no model needed (what the tests check against direct computation):
  :func:`mean_difference`, :func:`principal_direction` (repeng's PCA of paired differences),
  :func:`ablation_direction`, :func:`clamp_value`, :func:`least_squares`.

:func:`fit` ties them together for the CLI: ``fit(model, tok, pairs, site, method="mean_diff")``.
Prompts are strings (tokenized with ``tokenizer``) or lists of token ids (``tokenizer=None``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..core.patches import Ablate, Clamp, LowRank, Patch, Steer

POSITIONS = ("last", "mean")
METHODS = ("mean_diff", "pca", "ablate", "clamp", "lowrank")


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------
def tokenize(tokenizer, prompts: Sequence) -> list:
    """Token id lists, one per prompt; strings need a tokenizer, id lists pass through."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is a string but no tokenizer was given; pass token id lists "
                                 "or a tokenizer")
            ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization")
        out.append(list(ids))
    return out


def pad_batch(token_lists: Sequence, pad_id: int = 0, device=None):
    """Right-padded ``input_ids`` and ``attention_mask`` [B, S].

    Right padding keeps real tokens at positions 0..n-1, so causal models see exactly what they
    would see unpadded (the pads come after) and default position ids stay right.
    """
    B, S = len(token_lists), max(len(t) for t in token_lists)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, t in enumerate(token_lists):
        ids[b, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[b, :len(t)] = 1
    return ids.to(device), mask.to(device)


def pool(acts: torch.Tensor, mask: torch.Tensor, position: str) -> torch.Tensor:
    """One row per sequence from [B, S, D] activations: the last real token or the real-token mean."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    m = mask.to(device=acts.device, dtype=acts.dtype)
    if position == "mean":
        return (acts * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    # Last real position of each row (works for left or right padding).
    pos = torch.arange(acts.shape[1], device=acts.device).expand_as(m)
    last = torch.where(m > 0, pos, torch.full_like(pos, -1)).max(1).values
    return acts[torch.arange(acts.shape[0], device=acts.device), last]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def collect(model, tokenizer, prompts: Sequence, sites, *, position: str = "last", batch_size: int = 8,
            progress: bool = True, desc: str = "recording") -> dict:
    """Pooled activations {site: float32 CPU [N, D]} of ``prompts`` at ``sites`` (a name or a list).

    Runs the model (unpatched, or patched with :func:`fastpatch.hooks.apply`) in batches on its own
    device under ``torch.no_grad``.
    """
    from tqdm.auto import tqdm

    from ..integrations.hf.hooks import record

    sites = [sites] if isinstance(sites, str) else list(sites)
    if not sites:
        raise ValueError("collect() needs at least one site")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = tokenize(tokenizer, prompts)
    if not tokens:
        raise ValueError("collect() needs at least one prompt")
    pad_id = pad_token_id(tokenizer)
    device = _device_of(model)
    rows = {s: [] for s in sites}
    starts = range(0, len(tokens), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            ids, mask = pad_batch(tokens[start:start + batch_size], pad_id, device)
            with record(model, sites) as acts:
                model(input_ids=ids, attention_mask=mask)
            for s in sites:
                rows[s].append(pool(acts[s], mask, position).float().cpu())
    return {s: torch.cat(v) for s, v in rows.items()}


def pad_token_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None) if tokenizer is not None else None
        if v is not None:
            return int(v)
    return 0  # masked out anyway


# --------------------------------------------------------------------------------------------
# The maths on [N, D] rows
# --------------------------------------------------------------------------------------------
def _rows(name: str, x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64).cpu()


def _paired(pos, neg) -> tuple:
    pos, neg = _rows("positive activations", pos), _rows("negative activations", neg)
    if pos.shape != neg.shape:
        raise ValueError(f"positive and negative activations must be paired (same shape), got "
                         f"{tuple(pos.shape)} and {tuple(neg.shape)}")
    return pos, neg


def mean_difference(pos, neg) -> torch.Tensor:
    """mean(pos) − mean(neg), float64 [D] (the sets need not be paired)."""
    pos, neg = _rows("positive activations", pos), _rows("negative activations", neg)
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"hidden sizes differ: {pos.shape[1]} and {neg.shape[1]}")
    return pos.mean(0) - neg.mean(0)


def principal_direction(pos, neg, *, center: bool = True) -> torch.Tensor:
    """repeng's ``pca_diff``: the first principal component of the paired differences pos − neg.

    Like repeng (sklearn's PCA), the differences are centred first (``center=False`` skips that,
    giving the top right singular vector of the raw differences). The sign is chosen so that, in the
    majority of pairs, the positive prompt projects higher than its negative (repeng's rule), ties
    broken by the mean difference. Returned as a float64 vector scaled to the absolute mean projection
    of the differences on it, so ``Steer(v, 1.0)`` moves a row by the typical pos − neg gap along it;
    the scale never changes the direction the vote chose (a few large opposite pairs can make the mean
    projection negative while most pairs agree: repeng keeps the majority's sign, so does this).
    """
    pos, neg = _paired(pos, neg)
    diffs = pos - neg
    if diffs.shape[0] < 2 and center:
        raise ValueError("principal_direction needs at least 2 pairs (centred differences of 1 pair are 0)")
    x = diffs - diffs.mean(0) if center else diffs
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    if float(s[0]) == 0.0:
        raise ValueError("the differences have no variance; use mean_difference instead")
    u = vh[0]
    proj = diffs @ u
    votes = int((proj > 0).sum()) - int((proj < 0).sum())
    if votes < 0 or (votes == 0 and float(proj.mean()) < 0):
        u = -u
    return u * abs(float((diffs @ u).mean()))


def ablation_direction(pos, neg) -> torch.Tensor:
    """The normalised difference in means: the unit direction an :class:`Ablate` removes."""
    d = mean_difference(pos, neg)
    n = float(d.norm())
    if n == 0.0:
        raise ValueError("the two sets have equal means: no direction to ablate")
    return d / n


def clamp_value(rows, direction) -> float:
    """Mean projection of ``rows`` on the unit ``direction``: a clamp to it makes every row look alike."""
    rows = _rows("activations", rows)
    u = torch.as_tensor(direction).to(torch.float64).cpu()
    return float((rows @ (u / u.norm())).mean())


@dataclass
class LeastSquaresFit:
    """δ(h) = (h·A + bias)·B fitted so that h + δ(h) ≈ target; ``patch`` is the LowRank."""

    A: torch.Tensor  # [D, r]
    B: torch.Tensor  # [r, D]
    bias: torch.Tensor  # [r]
    residual: float  # mean squared error of h + δ(h) vs target over the rows
    patch: LowRank = field(repr=False, default=None)


def least_squares(h, target, *, rank: Optional[int] = None, ridge: float = 0.0,
                  intercept: bool = True) -> LeastSquaresFit:
    """Fit a low-rank patch from (h, target h) rows: minimise ‖H + (H A + 1 b)B − T‖² + ridge·‖A B‖².

    The edit Δ = T − H is regressed on [H, 1] (the intercept unpenalised), then reduced to ``rank``
    exactly by reduced-rank (ridge) regression: with W the ridge solution, project onto the top
    right singular vectors V_r of the fitted values [X; √Λ]·W (Mukherjee & Zhu 2011), so
    A = W_H V_r, b = w_1 V_r, B = V_rᵀ. ``rank=None`` keeps full rank (D).
    """
    h, t = _rows("h", h), _rows("target", target)
    if h.shape != t.shape:
        raise ValueError(f"h and target must have the same shape, got {tuple(h.shape)} and {tuple(t.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    N, D = h.shape
    r = D if rank is None else int(rank)
    if not 1 <= r <= D:
        raise ValueError(f"rank must be in [1, {D}], got {rank}")
    delta = t - h
    X = torch.cat([h, torch.ones(N, 1, dtype=torch.float64)], 1) if intercept else h
    k = X.shape[1]
    pen = torch.full((k,), float(ridge), dtype=torch.float64)
    if intercept:
        pen[-1] = 0.0
    # Ridge normal equations; lstsq (minimum norm) covers the rank-deficient ridge=0 case.
    gram = X.T @ X + torch.diag(pen)
    W = torch.linalg.lstsq(gram, X.T @ delta, driver="gelsd").solution  # [k, D]
    fitted = torch.cat([X @ W, pen.sqrt().unsqueeze(1) * W], 0)
    _, _, vh = torch.linalg.svd(fitted, full_matrices=False)
    V = vh[:r].T  # [D, r]
    WV = W @ V  # [k, r]
    A = WV[:D]
    bias = WV[D] if intercept else torch.zeros(r, dtype=torch.float64)
    B = V.T.contiguous()
    pred = h + (h @ A + bias) @ B
    fit = LeastSquaresFit(A.contiguous(), B, bias.contiguous(), float((pred - t).pow(2).mean()))
    fit.patch = LowRank(fit.A, fit.B, fit.bias)
    return fit


# --------------------------------------------------------------------------------------------
# From a model and prompt pairs to a patch
# --------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    patch: Patch
    site: str
    method: str
    position: str
    num_pairs: int
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        s = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.stats.items())
        return f"{self.method} patch at {self.site} from {self.num_pairs} pairs ({self.position} token): {s}"


def split_pairs(pairs) -> tuple:
    """(positives, negatives) from [{"positive": .., "negative": ..}, ...] or [(pos, neg), ...]."""
    pos, neg = [], []
    for i, p in enumerate(pairs):
        if isinstance(p, dict):
            if "positive" not in p or "negative" not in p:
                raise ValueError(f"pair {i} needs keys 'positive' and 'negative', has {sorted(p)}")
            a, b = p["positive"], p["negative"]
        else:
            try:
                a, b = p
            except (TypeError, ValueError) as exc:
                raise ValueError(f"pair {i} must be (positive, negative) or a dict, got {p!r}") from exc
        pos.append(a)
        neg.append(b)
    if not pos:
        raise ValueError("no prompt pairs given")
    return pos, neg


def fit(model, tokenizer, pairs, site: str, method: str = "mean_diff", *, position: str = "last",
        scale: float = 1.0, rank: int = 1, ridge: float = 0.0, clamp_to: str = "positive",
        batch_size: int = 8, progress: bool = True) -> FitResult:
    """Fit a patch at ``site`` from contrastive prompt ``pairs``.

    Methods: ``mean_diff`` / ``pca`` → :class:`Steer` (times ``scale``), ``ablate`` → :class:`Ablate`
    of the difference-in-means direction, ``clamp`` → :class:`Clamp` of that direction to the mean
    projection of the ``clamp_to`` set ("positive" or "negative"), ``lowrank`` → a rank-``rank``
    :class:`LowRank` mapping negatives onto their paired positives (``ridge`` regularised).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if clamp_to not in ("positive", "negative"):
        raise ValueError(f"clamp_to must be 'positive' or 'negative', got {clamp_to!r}")
    positives, negatives = split_pairs(pairs)
    pos = collect(model, tokenizer, positives, site, position=position, batch_size=batch_size,
                  progress=progress, desc="positive prompts")[site]
    neg = collect(model, tokenizer, negatives, site, position=position, batch_size=batch_size,
                  progress=progress, desc="negative prompts")[site]
    stats = {"separation": float(mean_difference(pos, neg).norm())}
    if method == "mean_diff":
        v = mean_difference(pos, neg)
        patch = Steer(v, scale)
        stats["norm"] = float(v.norm())
    elif method == "pca":
        v = principal_direction(pos, neg)
        patch = Steer(v, scale)
        stats["norm"] = float(v.norm())
        u = v / v.norm()
        stats["pairs_agreeing"] = float(((pos - neg).double() @ u > 0).double().mean())
    elif method == "ablate":
        patch = Ablate(ablation_direction(pos, neg))
    elif method == "clamp":
        u = ablation_direction(pos, neg)
        value = clamp_value(pos if clamp_to == "positive" else neg, u)
        patch = Clamp(u, value)
        stats["value"] = value
    else:
        res = least_squares(neg, pos, rank=rank, ridge=ridge)
        patch = res.patch
        stats["mse"] = res.residual
        stats["mse_before"] = float((neg.double() - pos.double()).pow(2).mean())
    return FitResult(patch, site, method, position, len(positives), stats)
