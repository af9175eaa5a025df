"""Shared pieces of the vLLM plugin tests (no tests here): environment, model folder, patch files, oracles.

The oracle for a patched request is plain Hugging Face: the same patch file loaded with fastpatch.load and
applied to the HF model, greedy-decoded token by token with full forwards (no KV cache, no vLLM code).
"""
from __future__ import annotations

import os

# vLLM reads these when it is imported / when an engine starts: set them before either.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest
import torch

import fastpatch
from fastpatch.core.algebra import compose

TOL = 2e-3  # max |Δ logprob| against Hugging Face (fp32)
MAX_TOKENS = 5
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """vLLM's CPU worker wants one torch thread per worker ("Reducing Torch threads ... for serving") but cannot
    set it after its thread binding; on a shared 2-core machine two OpenMP threads spinning at each barrier made
    a decode step ~9x slower (1.15 s vs 0.13 s for SmolLM2 batch 1, load ~6). Imported by each vLLM test module;
    the previous thread count comes back after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vllm_or_skip():
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # pragma: no cover - vLLM missing or broken here
        pytest.skip(f"vLLM is not importable here: {exc}")
    from importlib.metadata import entry_points

    if "fastpatch" not in {e.name for e in entry_points(group="vllm.general_plugins")}:
        pytest.skip("fastpatch's vllm.general_plugins entry point is not installed (pip install -e .)")


def smollm2_folder() -> str:
    from fastpatch.app.models import smollm2_checkpoint

    return str(smollm2_checkpoint())


def kind_patches(hidden: int, seed: int = 0) -> dict:
    """name -> {site: patch}: every patch kind, at every site family (pre, mid, post, the last layer)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def unit():
        u = rnd(hidden)
        return u / u.norm()

    q, _ = torch.linalg.qr(rnd(hidden, 4))
    R = q.T.contiguous()  # 4 orthonormal rows
    return {
        "steer": {"layers.10.resid_post": fastpatch.Steer(rnd(hidden, scale=4.0))},
        "steer_mid": {"layers.5.resid_mid": fastpatch.Steer(rnd(hidden, scale=4.0))},
        "steer_pre": {"layers.0.resid_pre": fastpatch.Steer(rnd(hidden, scale=0.2))},
        "steer_last": {"layers.29.resid_post": fastpatch.Steer(rnd(hidden, scale=3.0))},
        "ablate": {"layers.8.resid_post": fastpatch.Ablate(unit()), "layers.9.resid_mid": fastpatch.Ablate(unit())},
        "clamp": {"layers.12.resid_post": fastpatch.Clamp(unit(), 20.0)},
        "lowrank": {"layers.6.resid_post": fastpatch.LowRank(rnd(hidden, 3, scale=0.05), rnd(3, hidden, scale=0.5))},
        "loreft": {"layers.7.resid_post": fastpatch.LoReFT(R, rnd(4, hidden, scale=0.05), rnd(4, scale=2.0))},
        "gated": {"layers.11.resid_post": fastpatch.Gated(fastpatch.Steer(rnd(hidden, scale=4.0)), unit(), 0.0)},
        "composed": {"layers.13.resid_post": compose(fastpatch.Ablate(unit()),
                                                     fastpatch.Steer(rnd(hidden, scale=4.0)))},
    }


def write_files(folder, hf_model, patches: dict) -> dict:
    """name -> path of one fastpatch patch file per entry of ``patches`` (fingerprinted on ``hf_model``)."""
    out = {}
    for name, mapping in patches.items():
        out[name] = str(fastpatch.save(mapping, os.path.join(folder, f"{name}.safetensors"), model=hf_model))
    return out


def hf_greedy(hf_model, prompt_ids, n: int, patch_file=None):
    """(tokens, logprobs of the chosen tokens) of greedy decoding, the patch file applied with fastpatch.apply."""
    handle = fastpatch.apply(hf_model, fastpatch.load(patch_file)) if patch_file else None
    try:
        ids = torch.tensor([list(prompt_ids)])
        toks, lps = [], []
        with torch.no_grad():
            for _ in range(n):
                logits = hf_model(ids).logits[0, -1].double()
                lp = torch.log_softmax(logits, -1)
                t = int(lp.argmax())
                toks.append(t)
                lps.append(float(lp[t]))
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
    finally:
        if handle is not None:
            handle.remove()
    return toks, lps


def sampling(name=None, n=MAX_TOKENS):
    from vllm import SamplingParams

    extra = None if name is None else {"fastpatch": name}
    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True, extra_args=extra)


def tokens_and_logprobs(output):
    c = output.outputs[0]
    return list(c.token_ids), [c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids)]


def engine(folder, config=None, **kw):
    from vllm import LLM

    args = dict(model=folder, enforce_eager=True, dtype="float32", max_model_len=256, max_num_seqs=16, seed=0,
                enable_prefix_caching=True, block_size=32)
    args.update(kw)
    if config is not None:
        args["additional_config"] = {"fastpatch": config}
    return LLM(**args)
