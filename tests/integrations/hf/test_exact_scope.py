"""pyreft's f{p}+l{s} positions (issue 12, defect 6): p and s capped at n // 2 for a prompt of n real
tokens. Oracle: pyreft's ``get_intervention_locations`` rule written out here (with last_position = the
prompt length, as pyreft's LoReFT examples call it), applied by a plain torch hook."""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from models import tiny_model


def pyreft_positions(n: int, p: int, s: int) -> list:
    """pyreft.dataset.get_intervention_locations(last_position=n, first_n=p, last_n=s), padding dropped."""
    first_n = min(n // 2, p)
    last_n = min(n // 2, s)
    return sorted(set(range(first_n)) | set(range(n - last_n, n)))


def test_rule_examples():
    assert pyreft_positions(4, 3, 3) == [0, 1, 2, 3]
    assert pyreft_positions(3, 3, 3) == [0, 2]
    assert pyreft_positions(1, 2, 2) == []


# the families of issue #18 (MoE, Granite, LayerNorm pre-LN, OLMo 2, parallel blocks): slow
NEW_ARCHS = ("phi3", "qwen2_moe", "qwen3_moe", "mixtral", "granite", "stablelm", "starcoder2", "olmo", "olmo2",
             "gpt_neox", "cohere", "gptj", "falcon", "phi")


@pytest.mark.parametrize("arch", ["llama", *(pytest.param(a, marks=pytest.mark.slow) for a in NEW_ARCHS)])
@pytest.mark.parametrize("scope,p,s", [("f3+l3", 3, 3), ("f5", 5, 0), ("l4", 0, 4), ("f1+l2", 1, 2)])
def test_short_prompts_follow_pyreft(scope, p, s, arch):
    model = tiny_model(arch)
    v = torch.randn(64, generator=torch.Generator().manual_seed(9)) * 5
    L = model.config.num_hidden_layers
    for n in (1, 2, 3, 4, 5, 7, 9):
        x = torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n))
        # Left padding: positions count real tokens only.
        ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, n, dtype=torch.long)], 1)
        with fp.patched(model, {f"layers.{L - 1}.resid_post": fp.Scoped(fp.Steer(v), scope)}):
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask).logits[:, 3:]
        want = [3 + i for i in pyreft_positions(n, p, s)]

        def hook(module, args, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()  # Falcon's block returns a tuple
            h[:, want] += v
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        base = model.base_model
        hk = (base.layers if hasattr(base, "layers") else base.h)[L - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask).logits[:, 3:]
        finally:
            hk.remove()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"{scope} n={n}")
