"""A bf16 Llama (hidden 2048, random weights) on a GPU: fused patches vs an independent hook
implementation written here, and a patched decode step captured in a CUDA graph.

Oracle: the same patches applied by plain forward hooks on the decoder layers (resid_post: a
layer's output) of an fp32 copy of the model. The fused bf16 model must be as close to it as the
bf16 model with the same hooks is (HF's bf16 adds round twice; the fused kernel once), and the
patch must move the logits far more than that error. Marked ``gpu``.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastpatch as fp

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

D, LAYERS = 2048, 3


@pytest.fixture(scope="module")
def llama():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=D, intermediate_size=5632, num_hidden_layers=LAYERS,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=512,
                         rms_norm_eps=1e-5)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    return model.to("cuda", torch.bfloat16)


def _patches():
    gen = torch.Generator().manual_seed(1)
    steer = {i: torch.randn(D, generator=gen, dtype=torch.float64) * 0.05 for i in range(LAYERS)}
    down = torch.randn(D, 16, generator=gen, dtype=torch.float64) / D**0.5
    up = torch.randn(16, D, generator=gen, dtype=torch.float64) * 0.02
    patches = {f"layers.{i}.resid_post": fp.Steer(v) for i, v in steer.items()}
    patches[f"layers.{LAYERS - 1}.resid_post"] = fp.LowRank(down, up)
    return patches, steer, (down, up)


def _hooked(model, steer, lowrank):
    """Forward hooks, written independently of fastpatch: h' = h + v, or h + (h·down)·up."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, output, i=i):
            h = output[0] if isinstance(output, tuple) else output
            if i == LAYERS - 1:
                d, u = (t.to(h.device, torch.float32) for t in lowrank)
                new = (h.float() + (h.float() @ d) @ u).to(h.dtype)
            else:
                new = h + steer[i].to(h.device, h.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        handles.append(layer.register_forward_hook(hook))
    return handles


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_fused_bf16_llama_matches_hooks(llama):
    patches, steer, lowrank = _patches()
    ids = torch.randint(0, 1024, (2, 96), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    plain = _logits(llama, ids)

    truth_model = copy.deepcopy(llama).float()
    handles = _hooked(truth_model, steer, lowrank)
    truth = _logits(truth_model, ids)
    for h in handles:
        h.remove()
    del truth_model

    handles = _hooked(llama, steer, lowrank)
    hooks_bf16 = _logits(llama, ids)
    for h in handles:
        h.remove()

    with fp.patched(llama, patches):
        fused = _logits(llama, ids)
    err_fused = (fused - truth).abs().max().item()
    err_hooks = (hooks_bf16 - truth).abs().max().item()
    effect = (truth - plain).abs().max().item()
    assert effect > 10 * err_hooks, (effect, err_hooks)          # the patch matters
    assert err_fused <= 1.5 * err_hooks + 1e-3, (err_fused, err_hooks)
    assert torch.equal(_logits(llama, ids), plain)               # removed cleanly


def test_patched_decode_step_in_a_cuda_graph(llama):
    """Prefill eagerly into a StaticCache, capture one patched decode step, replay it: the logits
    equal an eager patched step at the same position and differ from an unpatched one."""
    from transformers import StaticCache

    patches, _, _ = _patches()
    prompt = torch.randint(0, 1024, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    P = prompt.shape[1]
    with fp.patched(llama, patches), torch.no_grad():
        cache = StaticCache(config=llama.config, max_cache_len=64)
        llama(prompt, past_key_values=cache, use_cache=True)
        ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        pos = torch.tensor([P], device="cuda")

        def step():
            return llama(ids, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                         use_cache=True).logits

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits_g = step()
        ids.fill_(7)
        graph.replay()
        replayed = logits_g.float().clone()
        eager = step().float()  # rewrites the same cache slot with the same values
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
    with torch.no_grad():
        plain_cache = StaticCache(config=llama.config, max_cache_len=64)
        llama(prompt, past_key_values=plain_cache, use_cache=True)
        plain = llama(ids, past_key_values=plain_cache, cache_position=pos, position_ids=pos[None],
                      use_cache=True).logits.float()
    assert (plain - eager).abs().max().item() > 0.1
