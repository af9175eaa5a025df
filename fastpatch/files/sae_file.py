"""Sparse autoencoder files: read an SAELens folder or a Gemma Scope ``params.npz`` into an :class:`SAE`
and turn feature edits into ordinary fastpatch patches (the file-reading, patch-building half of
``fastpatch.sae``; the public ``fastpatch.sae`` adds ``top`` and ``check``, which read a Hugging Face model).

An SAE at a residual site reads h [D] as feature activations

    f_i(h) = φ((h − b_dec·[apply_b_dec_to_input])·e_i + b_enc_i),   e_i = W_enc[:, i],  d_i = W_dec[i]

with φ = ReLU (SAELens "standard"), JumpReLU (ReLU(z)·[z > θ_i]: SAELens "jumprelu", Gemma Scope) or
TopK. A feature edit over a set S of features is one :class:`fastpatch.Encoded` of rank |S|, the b_dec
term folded into its bias (bias_i = b_enc_i − b_dec·e_i):

- ``clamp({i: v})``: h + Σ (v_i − f_i(h))·d_i   (down = e_S, up = −d_S, shift = Σ v_i·d_i)
- ``ablate([i])``:   clamp to 0
- ``scale({i: k})``: h + Σ (k_i − 1)·f_i(h)·d_i
- ``steer({i: α})``: h + Σ α_i·d_i, a plain :class:`fastpatch.Steer` (it reads no f_i, so it is affine)

TopK SAEs: f_i depends on whether feature i is among the k largest of all d_sae pre-activations, which
no per-feature patch computes, so clamp / ablate / scale refuse them; steer and encode work.

In files (layer 1), so the engines' integrations (the vLLM plugin's per-request SAE edits) can read SAEs.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..core.patches import Encoded, Steer
from ..core.sites import parse_site, split_site

__all__ = ["ARCHITECTURES", "SAE", "SAEError", "load", "site_of_hook"]

ARCHITECTURES = ("standard", "jumprelu", "topk")
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")


class SAEError(ValueError):
    """An SAE that fastpatch cannot load or a feature edit it cannot express exactly (the message says why)."""


def site_of_hook(hook_name: str) -> Optional[str]:
    """TransformerLens hook name → fastpatch site: ``blocks.12.hook_resid_post`` → ``layers.12.resid_post``."""
    m = _HOOK.match(hook_name.strip()) if isinstance(hook_name, str) else None
    return None if m is None else f"layers.{int(m.group(1))}.resid_{m.group(2)}"


class SAE:
    """One SAE at one residual site: its weights (float32, CPU) and the patches it makes.

    ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in],
    ``threshold`` [d_sae] (jumprelu only), ``k`` (topk only).
    """

    def __init__(self, W_enc, W_dec, b_enc, b_dec, *, architecture: str = "standard", site: Optional[str] = None,
                 threshold=None, apply_b_dec_to_input: bool = True, k: Optional[int] = None,
                 rescale_acts_by_decoder_norm: bool = False, source: str = "SAE"):
        self.source = source
        if architecture not in ARCHITECTURES:
            raise SAEError(f"{source}: architecture {architecture!r} is not supported; fastpatch.sae reads "
                           f"{ARCHITECTURES} SAEs")

        def t(name, v, shape):
            v = torch.as_tensor(v).detach().to("cpu", torch.float32)
            if tuple(v.shape) != shape:
                raise SAEError(f"{source}: {name} has shape {tuple(v.shape)}, expected {shape}")
            if not bool(torch.isfinite(v).all()):
                raise SAEError(f"{source}: {name} contains NaN or infinite values")
            return v.contiguous()

        W_enc = torch.as_tensor(W_enc)
        if W_enc.dim() != 2:
            raise SAEError(f"{source}: W_enc must be [d_in, d_sae], got shape {tuple(W_enc.shape)}")
        d_in, d_sae = (int(s) for s in W_enc.shape)
        self.W_enc = t("W_enc", W_enc, (d_in, d_sae))
        self.W_dec = t("W_dec", W_dec, (d_sae, d_in))
        self.b_enc = t("b_enc", b_enc, (d_sae,))
        self.b_dec = t("b_dec", b_dec, (d_in,))
        self.architecture = architecture
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.threshold = None
        if architecture == "jumprelu":
            if threshold is None:
                raise SAEError(f"{source}: a jumprelu SAE needs its per-feature threshold")
            self.threshold = t("threshold", threshold, (d_sae,))
        self.k = None
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        if architecture == "topk":
            if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
                raise SAEError(f"{source}: a topk SAE needs k in [1, {d_sae}], got {k!r}")
            self.k = k
        if site is not None and split_site(site) is None:
            raise SAEError(f"{source}: site {site!r} is not a site name; sites are 'layers.{{i}}.resid_pre', "
                           "'layers.{i}.resid_mid' or 'layers.{i}.resid_post'")
        self.site = site

    # -- shape --------------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def __repr__(self) -> str:
        return (f"SAE(site={self.site!r}, architecture={self.architecture!r}, d_in={self.d_in}, "
                f"d_sae={self.d_sae})")

    # -- the SAE itself ---------------------------------------------------------------------------

    def _decoder(self) -> torch.Tensor:
        """What one unit of feature i adds to h (TopK with rescale_acts_by_decoder_norm: d_i/‖d_i‖)."""
        if self.rescale_acts_by_decoder_norm:
            return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return self.W_dec

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Feature activations f(h) [..., d_sae] of rows h [..., d_in], in float32 (as SAELens computes them)."""
        h = torch.as_tensor(h)
        if h.shape[-1] != self.d_in:
            raise SAEError(f"encode: the input's last dimension is {h.shape[-1]}, the SAE's d_in is {self.d_in}")
        dev = h.device
        x = h.to(torch.float32)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec.to(dev)
        z = x @ self.W_enc.to(dev) + self.b_enc.to(dev)
        if self.architecture == "topk":
            if self.rescale_acts_by_decoder_norm:
                z = z * self.W_dec.norm(dim=-1).to(dev)
            vals, idx = z.topk(self.k, dim=-1)
            return torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))
        f = torch.relu(z)
        if self.threshold is not None:
            f = f * (z > self.threshold.to(dev))
        return f

    # -- feature edits → patches --------------------------------------------------------------------

    def _index(self, i: Any, what: str) -> int:
        if isinstance(i, torch.Tensor) and i.numel() == 1 and not i.is_floating_point():
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                import numpy as np
                if isinstance(i, np.integer):
                    i = int(i)
            except ImportError:  # pragma: no cover
                pass
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{what}: feature indices are ints, got {i!r}")
        if not 0 <= i < self.d_sae:
            raise SAEError(f"{what}: feature {i} is out of range; this SAE has {self.d_sae} features "
                           f"(0..{self.d_sae - 1})")
        return i

    def _items(self, values: Any, what: str) -> tuple[list[int], list[float]]:
        if not isinstance(values, dict):
            raise TypeError(f"{what} takes a dict {{feature: value}}, got {type(values).__name__}")
        if not values:
            raise SAEError(f"{what}: no features given")
        idx, vals = [], []
        for i, v in values.items():
            idx.append(self._index(i, what))
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = float(v)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise SAEError(f"{what}: feature {i}: the value must be a finite number, got {v!r}")
            vals.append(float(v))
        if len(set(idx)) != len(idx):
            raise SAEError(f"{what}: a feature is named twice")
        return idx, vals

    def _refuse_topk(self, what: str) -> None:
        if self.architecture == "topk":
            raise SAEError(
                f"{what} is not exact for a TopK SAE (k={self.k}): its feature i fires only when it is among the "
                f"k largest of all {self.d_sae} pre-activations, which depends on every other feature, and a "
                "per-feature patch cannot compute that. steer() works (it does not read the feature's activation)")

    def _encoder(self, idx: list[int]) -> dict:
        """down / bias / activation / threshold of the features ``idx``, float64, b_dec folded into the bias."""
        f = torch.float64
        cols = self.W_enc[:, idx].to(f)  # [D, r]
        bias = self.b_enc[idx].to(f)
        if self.apply_b_dec_to_input:
            bias = bias - self.b_dec.to(f) @ cols
        out = {"down": cols.T.contiguous(), "bias": bias, "activation": self.architecture, "threshold": None}
        if self.architecture == "standard":
            out["activation"] = "relu"
        else:
            out["threshold"] = self.threshold[idx].to(f)
        return out

    def clamp(self, values: dict) -> Encoded:
        """h' = h + Σ_i (value_i − f_i(h))·d_i: feature i's term in the reconstruction, f_i(h)·d_i, becomes
        value_i·d_i. Re-encoding h' reads f_i + (value_i − f_i)·(e_i·d_i) before the activation, which is value_i
        only where e_i·d_i = 1 (an SAE trained here has e_i·d_i ≈ 0.6: see docs/sae.md)."""
        self._refuse_topk("clamp")
        idx, vals = self._items(values, "clamp")
        enc = self._encoder(idx)
        dec = self._decoder()[idx].to(torch.float64)  # [r, D]
        v = torch.tensor(vals, dtype=torch.float64)
        shift = v @ dec if bool((v != 0).any()) else None
        return Encoded(enc["down"], enc["bias"], -dec, shift=shift, activation=enc["activation"],
                       threshold=enc["threshold"])

    def ablate(self, features: Iterable) -> Encoded:
        """clamp to 0: h' = h − Σ_i f_i(h)·d_i."""
        self._refuse_topk("ablate")
        if isinstance(features, torch.Tensor):
            features = features.reshape(-1).tolist()
        elif isinstance(features, int) and not isinstance(features, bool):
            features = [features]
        idx = [self._index(i, "ablate") for i in features]
        if not idx:
            raise SAEError("ablate: no features given")
        if len(set(idx)) != len(idx):
            raise SAEError("ablate: a feature is named twice")
        return self.clamp({i: 0.0 for i in idx})

    def scale(self, factors: dict) -> Encoded:
        """h' = h + Σ_i (k_i − 1)·f_i(h)·d_i: feature i's contribution multiplied by k_i."""
        self._refuse_topk("scale")
        idx, ks = self._items(factors, "scale")
        enc = self._encoder(idx)
        dec = self._decoder()[idx].to(torch.float64)
        up = (torch.tensor(ks, dtype=torch.float64) - 1.0)[:, None] * dec
        return Encoded(enc["down"], enc["bias"], up, activation=enc["activation"], threshold=enc["threshold"])

    def steer(self, alphas: dict) -> Steer:
        """h' = h + Σ_i α_i·d_i (a plain Steer: the SAE's features are only its directions here)."""
        idx, a = self._items(alphas, "steer")
        v = torch.tensor(a, dtype=torch.float64) @ self._decoder()[idx].to(torch.float64)
        return Steer(v)

    def edit(self, *, clamp: Optional[dict] = None, ablate: Optional[Iterable] = None,
             scale: Optional[dict] = None, steer: Optional[dict] = None):
        """Several feature edits read from one encoding of h, summed (each feature edited once):

        h' = h + Σ_clamp (v_i − f_i(h))·d_i − Σ_ablate f_i(h)·d_i + Σ_scale (k_i − 1)·f_i(h)·d_i + Σ_steer α_i·d_i

        One :class:`fastpatch.Encoded` of rank |clamp| + |ablate| + |scale| (a :class:`fastpatch.Steer`
        when only ``steer`` is given). This is what a vLLM request's ``{"sae": ..., "clamp": ...}`` applies."""
        kinds = {"clamp": clamp, "ablate": ablate, "scale": scale, "steer": steer}
        given = {k: v for k, v in kinds.items() if v is not None}
        if not given:
            raise SAEError("edit: no edit given (clamp, ablate, scale or steer)")
        parts, seen = [], {}
        values = dict(clamp or {})
        if ablate is not None:
            feats = ablate.reshape(-1).tolist() if isinstance(ablate, torch.Tensor) else (
                [ablate] if isinstance(ablate, int) and not isinstance(ablate, bool) else list(ablate))
            if not feats:
                raise SAEError("ablate: no features given")
            for i in feats:
                values[self._index(i, "ablate")] = 0.0
        for kind, feats in (("clamp", clamp or {}), ("ablate", [] if ablate is None else feats),
                            ("scale", scale or {}), ("steer", steer or {})):
            for i in feats:
                j = self._index(i, kind)
                if j in seen:
                    raise SAEError(f"edit: feature {j} is named twice ({seen[j]} and {kind}); edit each feature once")
                seen[j] = kind
        if values:
            parts.append(self.clamp(values).canonical())
        if scale is not None:
            parts.append(self.scale(scale).canonical())
        shift = None
        if steer is not None:
            shift = self.steer(steer).canonical().shift
        if not parts:
            return Steer(shift)
        f = torch.float64
        d = self.d_in
        down = torch.cat([c.down for c in parts])
        acts = tuple(a for c in parts for a in c.activations)
        thr = None
        if "jumprelu" in acts:
            thr = torch.cat([c.threshold if c.threshold is not None else torch.zeros(c.rank, dtype=f) for c in parts])
        total = sum((c.shift for c in parts), torch.zeros(d, dtype=f))
        if shift is not None:
            total = total + shift
        return Encoded(down, torch.cat([c.bias for c in parts]), torch.cat([c.up for c in parts]),
                       shift=total if bool((total != 0).any()) else None,
                       activation=acts[0] if len(set(acts)) == 1 else acts, threshold=thr)

    # -- against a model ----------------------------------------------------------------------------

    def check_dims(self, num_layers: int, hidden_size: int) -> None:
        """Raise SAEError unless a model of ``num_layers`` layers has this SAE's site and its hidden size is
        the SAE's d_in."""
        if self.site is None:
            raise SAEError(f"{self.source}: the SAE has no site; load it with site='layers.N.resid_post'")
        try:
            parse_site(self.site, int(num_layers))
        except ValueError as exc:
            raise SAEError(f"{self.source}: the SAE's site does not exist in this model: {exc}") from None
        if int(hidden_size) != self.d_in:
            raise SAEError(f"{self.source}: the SAE's d_in is {self.d_in}, the model's hidden size is {hidden_size}: "
                           "this SAE was trained on another model")

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path, *, site: Optional[str] = None) -> "SAE":
        """An SAE (of this class) from an SAELens folder or a Gemma Scope params.npz: see :func:`load`."""
        return load(path, site=site, cls=cls)


# -- loading ------------------------------------------------------------------------------------------


def load(path, *, site: Optional[str] = None, cls: Optional[type] = None) -> SAE:
    """An SAE from an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) or a Gemma Scope
    ``params.npz`` (a file, or a folder holding one; ``site=`` required). ``site=`` overrides the site
    read from the SAELens config's hook name. ``cls``: the SAE class to build (a subclass of :class:`SAE`)."""
    cls = SAE if cls is None else cls
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        return _load_npz(p, site, cls)
    if p.is_file() and p.name == "cfg.json":
        p = p.parent
    if p.is_dir():
        if (p / "cfg.json").is_file():
            return _load_saelens(p, site, cls)
        if (p / "params.npz").is_file():
            return _load_npz(p / "params.npz", site, cls)
        raise SAEError(f"{p}: neither an SAELens folder (cfg.json + sae_weights.safetensors) nor a Gemma Scope "
                       "folder (params.npz)")
    raise SAEError(f"{p}: no such SAE folder or params.npz file")


def _load_npz(path: Path, site: Optional[str], cls: type) -> SAE:
    import numpy as np

    src = str(path)
    if site is None:
        raise SAEError(f"{src}: a Gemma Scope params.npz does not name its site; pass site='layers.N.resid_post'")
    with np.load(path) as z:
        missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k not in z.files]
        if missing:
            raise SAEError(f"{src}: a Gemma Scope params.npz holds W_enc, W_dec, b_enc, b_dec and threshold; "
                           f"missing {missing}")
        arrays = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in
                  ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
    # Gemma Scope's JumpReLU: f = ReLU(z)·[z > θ] with z = h·W_enc + b_enc (no b_dec on the input)
    return cls(arrays["W_enc"], arrays["W_dec"], arrays["b_enc"], arrays["b_dec"], architecture="jumprelu",
               threshold=arrays["threshold"], apply_b_dec_to_input=False, site=site, source=src)


def _load_saelens(folder: Path, site: Optional[str], cls: type) -> SAE:
    from safetensors.torch import load_file

    src = str(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except (OSError, ValueError) as exc:
        raise SAEError(f"{src}: cannot read cfg.json: {exc}") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{src}: cfg.json is not an object")
    weights = folder / "sae_weights.safetensors"
    if not weights.is_file():
        raise SAEError(f"{src}: sae_weights.safetensors is missing")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    def get(key, default=None):
        return cfg[key] if key in cfg else meta.get(key, default)

    # architecture: SAELens 6 writes it; older configs are "standard" with activation_fn(_str) relu or topk
    arch = cfg.get("architecture") or "standard"
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")) or "relu"
    k = None
    if arch == "standard" and act == "topk":
        arch = "topk"
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    elif arch == "standard" and act != "relu":
        raise SAEError(f"{src}: activation_fn {act!r} is not supported; fastpatch.sae reads ReLU, JumpReLU and "
                       "TopK SAEs")
    if arch == "topk":
        k = cfg.get("k", k)
    if arch not in ARCHITECTURES:
        raise SAEError(f"{src}: architecture {arch!r} is not supported; fastpatch.sae reads {ARCHITECTURES} SAEs "
                       "(an SAE whose encoder is not one linear map + ReLU / JumpReLU / TopK per feature has no "
                       "per-feature patch form)")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEError(f"{src}: normalize_activations={norm!r} rescales the input by a per-token (or data-set) "
                       "statistic before encoding, which a per-feature patch does not compute; fastpatch.sae reads "
                       "SAEs with normalize_activations 'none' (fold the scaling into W_enc / b_enc / W_dec first)")
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise SAEError(f"{src}: reshape_activations={cfg['reshape_activations']!r} (an attention hook_z SAE) reads "
                       "per-head outputs, not the residual stream fastpatch patches")
    if get("hook_head_index") is not None:
        raise SAEError(f"{src}: hook_head_index={get('hook_head_index')} reads one attention head, not the "
                       "residual stream fastpatch patches")
    if cfg.get("finetuning_scaling_factor"):
        raise SAEError(f"{src}: finetuning_scaling_factor is set (a learned per-feature scale on the decoder); "
                       "fold it into W_dec first")

    hook = get("hook_name") or get("hook_point")
    if site is None:
        if not hook:
            raise SAEError(f"{src}: cfg.json names no hook (metadata.hook_name); pass site='layers.N.resid_post'")
        site = site_of_hook(hook)
        if site is None:
            raise SAEError(f"{src}: hook {hook!r} is not a residual-stream hook (blocks.N.hook_resid_pre / _mid / "
                           "_post); fastpatch patches the residual stream only. If it is one under another name, "
                           "pass site='layers.N.resid_post'")

    sd = load_file(str(weights))
    need = ["W_enc", "W_dec", "b_enc", "b_dec"]
    missing = [n for n in need if n not in sd]
    if missing:
        raise SAEError(f"{src}: sae_weights.safetensors lacks {missing}")
    threshold = None
    if arch == "jumprelu":
        if "threshold" in sd:
            threshold = sd["threshold"]
        elif "log_threshold" in sd:  # a JumpReLU training SAE's form
            threshold = sd["log_threshold"].to(torch.float64).exp()
        else:
            raise SAEError(f"{src}: a jumprelu SAE's weights lack 'threshold'")
    d_in = cfg.get("d_in")
    if d_in is not None and tuple(sd["W_enc"].shape[:1]) != (int(d_in),):
        raise SAEError(f"{src}: cfg.json says d_in={d_in}, W_enc has shape {tuple(sd['W_enc'].shape)}")
    return cls(sd["W_enc"], sd["W_dec"], sd["b_enc"], sd["b_dec"], architecture=arch, site=site,
               threshold=threshold, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), k=k,
               rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)), source=src)
