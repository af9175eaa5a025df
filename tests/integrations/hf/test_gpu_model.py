"""A bf16 Llama (hidden 2048, random weights) on a GPU: fused patches vs an independent hook
implementation written here, and a patched forward captured in a CUDA graph.

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


@pytest.mark.parametrize("shape", [(8, 1), (1, 128)], ids=["decode-shaped", "prefill-shaped"])
def test_patched_forward_in_a_cuda_graph(llama, shape):
    """A whole patched forward (steer at every layer, rank 16 at the last; step hooks, per-step
    slots and fused kernels) captured in a CUDA graph and replayed on new token ids equals an eager
    patched forward, and differs from the unpatched one. (8, 1) is a decode step's shape: the
    per-shape choice takes the CUDA row kernels; (1, 128) takes the Triton tile kernel for rank 16.
    No KV cache: HF's StaticCache API differs across transformers 5.x releases."""
    patches, _, _ = _patches()
    gen = torch.Generator("cuda").manual_seed(3)
    static_ids = torch.randint(0, 1024, shape, device="cuda", generator=gen)
    new_ids = torch.randint(0, 1024, shape, device="cuda", generator=gen)
    with fp.patched(llama, patches), torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # JIT compiles, backend builds, allocator warm-up outside the capture
                llama(static_ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits_g = llama(static_ids, use_cache=False).logits
        static_ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        replayed = logits_g.float().clone()
        eager = llama(new_ids, use_cache=False).logits.float()
    torch.testing.assert_close(replayed, eager, rtol=0, atol=1e-2)
    with torch.no_grad():
        plain = llama(new_ids, use_cache=False).logits.float()
    assert (plain - eager).abs().max().item() > 0.1
