"""The patched vLLM norm on its own (no engine): vLLM's RMSNorm / GemmaRMSNorm modules with fastpatch's
forward, both norm modes, against plain torch: h = x + residual, the row's patch by its definition
(CanonicalPatch.apply), then vLLM's own norm forward on h."""
from __future__ import annotations

import pytest
import torch

import fastpatch
from vllm_common import vllm_or_skip


def _norm(cls_name: str, d: int):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import layernorm

    with set_current_vllm_config(VllmConfig()):
        norm = getattr(layernorm, cls_name)(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=torch.Generator().manual_seed(5)) * 0.3
                          + (0 if "Gemma" in cls_name else 1))
    return norm


@pytest.mark.parametrize("cls_name,offset", [("RMSNorm", 0.0), ("GemmaRMSNorm", 1.0)])
@pytest.mark.parametrize("mode", ["exact", "fused"])
def test_patched_norm_rows(cls_name, offset, mode):
    vllm_or_skip()
    from fastpatch.core.bank import PatchBank
    from fastpatch.integrations.vllm.model import _patch_norm
    from fastpatch.kernels import backends

    d, n = 64, 7
    g = torch.Generator().manual_seed(0)
    patches = [fastpatch.Steer(torch.randn(d, generator=g)),
               fastpatch.LowRank(torch.randn(d, 2, generator=g) * 0.3, torch.randn(2, d, generator=g)),
               fastpatch.Gated(fastpatch.Steer(torch.randn(d, generator=g)), torch.randn(d, generator=g), 0.0)]
    bank = PatchBank(patches, d)
    index = torch.tensor([-1, 0, 1, 2, -1, 2, 0, -1, -1], dtype=torch.int32)
    vanilla = _norm(cls_name, d)
    patched = _norm(cls_name, d)
    _patch_norm(patched, ("mid", 0), bank, index, backends.resolve("cpp", torch.device("cpu")), mode, offset)
    x, r = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    out, summed = patched(x.clone(), r.clone())
    h = (x + r).double()
    want = h.clone()
    for row in range(n):
        k = int(index[row])
        if k >= 0:
            want[row] = patches[k].canonical().apply(h[row:row + 1])[0]
    torch.testing.assert_close(summed.double(), want, rtol=0, atol=1e-5)
    want_out = vanilla(want.float())
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    plain = index[:n] < 0
    v_out, v_sum = vanilla(x.clone(), r.clone())
    assert torch.equal(summed[plain], v_sum[plain])
    if mode == "exact":  # rows without a patch: bit-identical to vanilla vLLM
        assert torch.equal(out[plain], v_out[plain])
