"""Model-level benchmark behind `fastpatch bench`: HF eager vs hooks vs fused patches.

All variants share one model, so an 8B model needs the memory of one copy, not seven: a variant's
patches are applied, its forwards timed, and the patches removed again (applying and removing stay
outside the timed region). Every variant is checked once to leave the model's output bit-for-bit as
it found it. Variants run round-robin: each prefill repeat, and each block of ``decode_block``
decode steps, is timed for all variants back to back (each variant with its own KV cache), and ratios
are medians of the paired samples (step j of a block against step j of the other variants' blocks
of the same round) — CPU timings here swing several-fold between runs, paired ratios much less.
Blocks rather than single steps because applying is not free (1-8 ms per apply + remove on the
default model on a loaded 2-core CPU, without fastpatch.apply's check of the fused blocks, which the
warm-up runs once per variant) and the first forward after an apply rebuilds small per-handle caches;
in blocks of 8 both touch one sample in 8, which the median ignores.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Optional

import torch


@dataclass
class BenchConfig:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1408
    vocab: int = 8192
    batch: int = 4
    prompt_len: int = 32
    new_tokens: int = 128
    decode_block: int = 8  # decode steps per variant per round (one apply/remove per block)
    repeats: int = 7
    rank: int = 16
    bank_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    backend: Optional[str] = None
    model: Optional[str] = None  # --model: a local HF folder, a hub id or 'smollm2' instead of the built-in config
    arch: str = "llama"  # --arch: the family of the built-in random-weight model (ARCH_CONFIGS)
    variants: list = field(default_factory=list)  # empty = all
    seed: int = 0
    # --steer-scale: the scale of every steering vector (unit-variance direction / sqrt(hidden) x this).
    # On a mixture-of-experts model a steer of the default size changes which experts the tokens go to,
    # so the patched run does different MoE work; a tiny one (1e-6) keeps the routing and measures the
    # cost of the patch itself. The routing check in the result says which.
    steer_scale: float = 2.0

    def resolved_device(self) -> torch.device:
        from .models import parse_device

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return parse_device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        from .models import parse_dtype

        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return parse_dtype(self.dtype)


# --arch: transformers config class and the family's own settings on top of the shared sizes
# (hidden, layers, heads, kv_heads, intermediate, vocab). MoE families get 8 experts, top-2, each expert
# half the MLP width. Token ids are set where a family's defaults lie outside a small vocabulary.
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
ARCH_CONFIGS: dict = {
    "llama": ("LlamaConfig", {"rms_norm_eps": 1e-6}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "phi3": ("Phi3Config", _IDS),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                                     "moe_intermediate_size": "half", "shared_expert_intermediate_size": "half"}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                                     "moe_intermediate_size": "half"}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
                                  "intermediate_size": "half"}),
    "granite": ("GraniteConfig", {"residual_multiplier": 0.22, "embedding_multiplier": 12.0,
                                  "attention_multiplier": 0.0078125, "logits_scaling": 8.0}),
    "stablelm": ("StableLmConfig", {"use_parallel_residual": False}),
    "starcoder2": ("Starcoder2Config", {"sliding_window": None, "bos_token_id": 1, "eos_token_id": 2}),
    "olmo": ("OlmoConfig", _IDS),
    # new block styles (#18): norms after each branch; parallel attention + MLP blocks
    "olmo2": ("Olmo2Config", _IDS),
    "gpt_neox": ("GPTNeoXConfig", {"use_parallel_residual": True, "bos_token_id": 1, "eos_token_id": 2}),
    "cohere": ("CohereConfig", _IDS),
}


def arch_config(cfg: BenchConfig):
    """The transformers config of the built-in model for ``cfg.arch``."""
    import transformers

    if cfg.arch not in ARCH_CONFIGS:
        raise ValueError(f"fastpatch bench: unknown --arch {cfg.arch!r}; choose one of {', '.join(ARCH_CONFIGS)}, "
                         "or load a real model with --model")
    cls_name, extra = ARCH_CONFIGS[cfg.arch]
    kw = dict(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
              num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.intermediate, vocab_size=cfg.vocab,
              max_position_embeddings=max(2048, cfg.prompt_len + cfg.new_tokens + 8))
    kw.update({k: cfg.intermediate // 2 if v == "half" else v for k, v in extra.items()})
    return getattr(transformers, cls_name)(**kw)


def build_model(cfg: BenchConfig, progress: bool = False):
    """The default: a small model of the ``--arch`` family (Llama unless given) from a config, random weights."""
    from transformers import AutoModelForCausalLM

    from .models import load_model

    device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
    torch.manual_seed(cfg.seed)
    if cfg.model:
        if cfg.arch != "llama":
            raise ValueError(f"fastpatch bench: --arch {cfg.arch} builds a random-weight model and --model loads "
                             f"{cfg.model!r}; give one of them")
        model, _ = load_model(cfg.model, dtype, tokenizer=False, progress=progress)
    else:
        config = arch_config(cfg)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    return model.to(device).eval()


def _layer_sites(num_layers: int) -> list[str]:
    return [f"layers.{i}.resid_post" for i in range(num_layers)]


def variant_names(cfg: BenchConfig) -> list[str]:
    """Every variant, in timing order (``--variants`` picks from these)."""
    return ["hf_eager", "hf_hooks_steer", "fastpatch_unpatched", "fastpatch_steer", f"fastpatch_lowrank{cfg.rank}",
            "fastpatch_gated", f"fastpatch_bank{cfg.bank_size}_mixed"]


def _variants(cfg: BenchConfig, D: int, L: int, device) -> dict[str, Callable]:
    """name -> function(model, verify) that patches the model and returns its handle (None: left as it is).

    The patches are made here, once, so that every application of a variant is the same. ``verify`` is
    fastpatch.apply's check of the fused blocks against transformers' own forward: the warm-up asks for
    it once per variant, the timed rounds skip it (it costs about a forward)."""
    import fastpatch as fp
    from fastpatch import hooks

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    sites = _layer_sites(L)

    def steer():
        return fp.Steer(torch.randn(D, generator=gen) / D**0.5, scale=cfg.steer_scale)

    def lowrank():
        return fp.LowRank(torch.randn(D, cfg.rank, generator=gen) / D**0.5,
                          torch.randn(cfg.rank, D, generator=gen) / cfg.rank**0.5 * 0.1)

    def gated():
        return fp.Gated(steer(), torch.randn(D, generator=gen), threshold=0.0)

    def bank():
        return fp.PatchBank([steer() for _ in range(cfg.bank_size)], D).to(device)

    mixed_ids = torch.tensor([(i % (cfg.bank_size + 1)) - 1 for i in range(cfg.batch)], device=device)
    hooked = {s: steer() for s in sites}
    nothing = {s: None for s in sites}
    steered = {s: steer() for s in sites}
    lowranks = {s: lowrank() for s in sites}
    gateds = {s: gated() for s in sites}
    banks = {s: bank() for s in sites}

    b = cfg.backend
    appliers = [
        lambda m, verify: None,                                                   # hf_eager
        lambda m, verify: hooks.apply(m, hooked),                                 # hf_hooks_steer
        lambda m, verify: fp.apply(m, nothing, backend=b, verify=verify),         # fastpatch_unpatched
        lambda m, verify: fp.apply(m, steered, backend=b, verify=verify),         # fastpatch_steer
        lambda m, verify: fp.apply(m, lowranks, backend=b, verify=verify),        # fastpatch_lowrank{rank}
        lambda m, verify: fp.apply(m, gateds, backend=b, verify=verify),          # fastpatch_gated
        lambda m, verify: fp.apply(m, banks, backend=b, verify=verify).select(mixed_ids),  # bank{size}_mixed
    ]
    return dict(zip(variant_names(cfg), appliers, strict=True))


@contextmanager
def _applied(model, variant: Callable, verify: bool = False):
    """The model patched by one variant inside the block, as it was after it."""
    handle = variant(model, verify)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _check_restored(model, probe: dict, expected: torch.Tensor, after: str) -> None:
    """Removing a variant's patches must give back the unpatched model exactly (same bits)."""
    with torch.inference_mode():
        got = model(**probe).logits
    if not torch.equal(got, expected):
        raise RuntimeError(f"fastpatch bench: after removing {after!r} the model's output differs from the "
                           "unpatched output; the timings of later variants would be wrong")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _cache_kwarg(model) -> str:
    """transformers renamed the KV-cache argument `past_key_values` -> `cache` (5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _moe_gates(model) -> list:
    """The router of every mixture-of-experts block (a module with ``gate`` and ``experts``), in order."""
    return [m.gate for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]


def _expert_ids(output, k: int) -> torch.Tensor:
    """The top-k expert ids per token from a router's output: transformers 5.x routers return
    (logits, weights, expert ids); older ones (a Linear) the logits, whose top-k the block takes."""
    if isinstance(output, tuple):
        return output[2].detach().sort(-1).values
    return output.detach().topk(k, dim=-1).indices.sort(-1).values


def _routing(model, gates, k: int, ids: torch.Tensor) -> list:
    """Expert ids per token per MoE layer for one full forward of ``ids`` (no cache)."""
    seen = []
    hs = [g.register_forward_hook(lambda m, a, o: seen.append(_expert_ids(o, k))) for g in gates]
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hs:
            h.remove()
    return seen


def _routing_check(model, makers, names, prompt, generated) -> Optional[dict]:
    """On a mixture-of-experts model: per variant, whether it decoded the same tokens as the unpatched
    model and sent every token (prompt + its own decoded tokens) to the same top-k experts in every MoE
    layer. None for a dense model. Differences mean the variant's timings include different MoE work."""
    gates = _moe_gates(model)
    if not gates:
        return None
    k = getattr(model.config, "num_experts_per_tok", None) or 2
    ref_tokens = generated.get("fastpatch_unpatched", generated.get("hf_eager"))
    out = {}
    for n in names:
        seq = torch.cat([prompt, generated[n]], dim=1)
        ref = _routing(model, gates, k, seq)  # the unpatched model on the same tokens
        with _applied(model, makers[n]):
            got = _routing(model, gates, k, seq)
        differ = sum(int((a != b).any(-1).sum()) for a, b in zip(got, ref))
        total = sum(a.shape[0] for a in ref)
        out[n] = {"same_tokens_as_unpatched": bool(ref_tokens is not None and torch.equal(generated[n], ref_tokens)),
                  "token_layers_routed_differently": differ, "token_layers": total}
    return out


def run_bench(cfg: BenchConfig, progress: bool = True, model=None) -> dict:
    """Time every variant on one model (``model``, else built from ``cfg``); the model is left unpatched."""
    from tqdm.auto import tqdm

    unknown = sorted(set(cfg.variants) - set(variant_names(cfg)))
    if unknown:  # before the model loads
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(variant_names(cfg))}")
    if cfg.decode_block < 1:
        raise ValueError(f"--decode-block must be >= 1, got {cfg.decode_block}")
    if model is None:
        model = build_model(cfg, progress=progress)
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    D, L = model.config.hidden_size, model.config.num_hidden_layers
    makers = _variants(cfg, D, L, device)
    names = [n for n in makers if not cfg.variants or n in cfg.variants]

    gen = torch.Generator().manual_seed(cfg.seed + 2)
    prompt = torch.randint(0, model.config.vocab_size, (cfg.batch, cfg.prompt_len), generator=gen).to(device)
    mask = torch.ones_like(prompt)
    probe = {"input_ids": prompt[:, :8], "attention_mask": mask[:, :8]}
    prefill = {n: [] for n in names}
    decode = {n: [] for n in names}
    total = cfg.repeats * len(names) + cfg.new_tokens * len(names)
    bar = tqdm(total=total, desc="fastpatch bench", disable=not progress, unit="run")

    def forward(variant, verify=False, **kw):
        with _applied(model, makers[variant], verify), torch.inference_mode():
            return _timed(lambda: model(**kw), device)

    with torch.inference_mode():
        unpatched = model(**probe).logits
    for n in names:  # warm-up (first calls build kernels / allocate), fused blocks verified once, and
        forward(n, verify=True, **probe)  # the check that removing the patches restores the model
        _check_restored(model, probe, unpatched, n)
    for _ in range(cfg.repeats):
        for n in names:
            prefill[n].append(forward(n, input_ids=prompt, attention_mask=mask)[0])
            bar.update(1)
    cache_kw = _cache_kwarg(model)
    caches, nxt, masks, generated = {}, {}, {}, {}
    for n in names:
        caches[n] = _new_cache(model)
        _, out = forward(n, input_ids=prompt, attention_mask=mask, use_cache=True, **{cache_kw: caches[n]})
        nxt[n] = out.logits[:, -1:].argmax(-1)
        masks[n] = mask
        generated[n] = [nxt[n]]
    for start in range(0, cfg.new_tokens, cfg.decode_block):
        steps = min(cfg.decode_block, cfg.new_tokens - start)
        for n in names:
            with _applied(model, makers[n]), torch.inference_mode():
                for _ in range(steps):
                    masks[n] = torch.cat([masks[n], torch.ones_like(nxt[n])], dim=1)
                    dt, out = _timed(lambda: model(input_ids=nxt[n], attention_mask=masks[n], use_cache=True,
                                                   **{cache_kw: caches[n]}), device)
                    decode[n].append(dt)
                    nxt[n] = out.logits[:, -1:].argmax(-1)
                    generated[n].append(nxt[n])
                    bar.update(1)
    bar.close()
    _check_restored(model, probe, unpatched, names[-1])
    tokens = {n: torch.cat(generated[n][:-1] or [prompt[:, :0]], dim=1) for n in names}  # the tokens fed
    result = _summarise(cfg, names, prefill, decode, device, dtype, model)
    result["routing"] = _routing_check(model, makers, names, prompt, tokens)
    return result


def _paired_ratio(a: list, b: list) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _summarise(cfg, names, prefill, decode, device, dtype, model) -> dict:
    base = names[0] if "hf_eager" not in names else "hf_eager"
    fused = "fastpatch_unpatched" if "fastpatch_unpatched" in names else base
    rows = []
    for n in names:
        rows.append({
            "variant": n,
            "prefill_ms": 1e3 * statistics.median(prefill[n]),
            "decode_ms_per_token": 1e3 * statistics.median(decode[n]),
            "samples": {"prefill": len(prefill[n]), "decode": len(decode[n])},
            "prefill_vs_hf_eager": _paired_ratio(prefill[n], prefill[base]),
            "decode_vs_hf_eager": _paired_ratio(decode[n], decode[base]),
            "decode_vs_fastpatch_unpatched": _paired_ratio(decode[n], decode[fused]),
        })
    import fastpatch

    return {
        "config": asdict(cfg),
        "device": (torch.cuda.get_device_name() if device.type == "cuda"
                   else (platform.processor() or platform.machine())),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "model": {"architecture": type(model).__name__, "hidden": model.config.hidden_size,
                  "layers": model.config.num_hidden_layers,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "versions": {"torch": torch.__version__, "fastpatch": fastpatch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }


def format_table(result: dict) -> str:
    head = (f"fastpatch bench — {result['model']['architecture']} hidden {result['model']['hidden']}, "
            f"{result['model']['layers']} layers, {result['dtype']}, {result['device_type']} "
            f"({result['device']}, {result['threads']} threads), batch {result['config']['batch']}, "
            f"prompt {result['config']['prompt_len']}, {result['config']['new_tokens']} new tokens")
    lines = [head, "",
             "| variant | prefill ms | decode ms/token | prefill / HF eager | decode / HF eager "
             "| decode / fastpatch unpatched |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['prefill_ms']:.2f} | {r['decode_ms_per_token']:.3f} | "
                     f"{r['prefill_vs_hf_eager']:.3f} | {r['decode_vs_hf_eager']:.3f} | "
                     f"{r['decode_vs_fastpatch_unpatched']:.3f} |")
    lines.append("")
    lines.append("Ratios are medians of paired samples (each variant timed back to back); < 1 is faster.")
    routing = result.get("routing")
    if routing:
        scale = result["config"]["steer_scale"]
        lines += ["", f"Mixture-of-experts routing vs the unpatched model (steer scale {scale}; top-k expert ids "
                  "of every token, prompt + decoded, in every MoE layer):", ""]
        for n, r in routing.items():
            lines.append(f"- {n}: same decoded tokens {'yes' if r['same_tokens_as_unpatched'] else 'NO'}, "
                         f"{r['token_layers_routed_differently']} of {r['token_layers']} token-layers routed "
                         "differently" + ("" if r["token_layers_routed_differently"] == 0 and
                                          r["same_tokens_as_unpatched"] else " (timings include other MoE work)"))
    return "\n".join(lines)


PLOT_INSTALL = "pip install 'fastpatch[plot]' (or pip install matplotlib)"


def plot(result: dict, path: str) -> bool:
    """Write the ratio plot to ``path``; False (nothing written) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "prefill_vs_hf_eager", "prefill"),
                           (axes[1], "decode_vs_hf_eager", "decode per token")):
        vals = [r[key] for r in rows]
        colors = ["#999999" if label.startswith("hf_") else "#1f77b4" for label in labels]
        ax.barh(labels, vals, color=colors)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
        ax.set_title(f"{title}: time / HF eager (lower is faster)")
        ax.invert_yaxis()
    fig.suptitle(f"fastpatch bench: {result['model']['architecture']} hidden {result['model']['hidden']} × "
                 f"{result['model']['layers']} layers, {result['dtype']}, {result['device_type']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(result: dict, out_dir: str, stem: str = "bench") -> dict:
    """bench.json, bench.md and bench.png in ``out_dir``; paths["png"] is None where no plot was made."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "png": os.path.join(out_dir, f"{stem}.png"),
             "md": os.path.join(out_dir, f"{stem}.md")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(format_table(result) + "\n")
    if not plot(result, paths["png"]):
        paths["png"] = None
    return paths
