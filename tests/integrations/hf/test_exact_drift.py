"""apply() checks each distinct fused module class against its own forward (issue 12, "robust against
drift"): a block whose class forward no longer matches fused.py is refused with an error naming it."""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from fastpatch.integrations.hf.drift import FusedMismatchError
from models import ARCHS, FAST_ARCHS, tiny_model

PARAMS = [pytest.param(a, marks=() if a in FAST_ARCHS + ("bert",) else pytest.mark.slow)
          for a in ARCHS + ("bert",)]


@pytest.mark.parametrize("arch", PARAMS)
def test_supported_architectures_pass_the_check(arch):
    model = tiny_model(arch)
    with fp.patched(model, {}) as h:
        assert h.implementation == "fused"


def _drifted_subclass(cls, forward):
    return type("Drifted" + cls.__name__, (cls,), {"forward": forward, "__module__": "drifted_transformers"})


def test_changed_block_is_refused_and_the_model_left_untouched():
    model = tiny_model("llama")
    layers = model.model.layers
    base_forward = type(layers[0]).forward

    def forward(self, hidden_states, *args, **kwargs):  # a "new release" that scales the residual stream
        return base_forward(self, hidden_states, *args, **kwargs) * 1.01

    cls = _drifted_subclass(type(layers[0]), forward)
    for b in layers:
        b.__class__ = cls
    ids = torch.randint(1, 128, (1, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(FusedMismatchError, match="DriftedLlamaDecoderLayer"):
        fp.apply(model, {"layers.1.resid_post": fp.Steer(torch.ones(64))})
    assert all("forward" not in b.__dict__ for b in layers)
    assert not model.model._forward_pre_hooks and not any(b._forward_pre_hooks for b in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    h = fp.apply(model, {}, fallback="hooks")  # the hooks path does not depend on fused.py
    assert h.implementation == "hooks"
    h.remove()
    h = fp.apply(model, {}, verify=False)  # opt-out for who knows better
    h.remove()


def test_changed_norm_is_refused():
    model = tiny_model("gemma")
    norm = model.model.layers[1].input_layernorm
    cls = type(norm)

    def forward(self, x):  # e.g. a release that drops Gemma's 1 + w for w
        out = self._norm(x.float()) * self.weight.float()
        return out.type_as(x)

    norm.__class__ = _drifted_subclass(cls, forward)
    with pytest.raises(FusedMismatchError, match="DriftedGemmaRMSNorm"):
        fp.apply(model, {})


def test_changed_bert_output_is_refused():
    model = tiny_model("bert")
    out = model.encoder.layer[0].output
    cls = type(out)

    def forward(self, hidden_states, input_tensor):  # post-LN turned pre-LN
        return self.dropout(self.dense(hidden_states)) + self.LayerNorm(input_tensor)

    for layer in model.encoder.layer:
        layer.output.__class__ = _drifted_subclass(cls, forward)
    with pytest.raises(FusedMismatchError, match="DriftedBertOutput"):
        fp.apply(model, {})
