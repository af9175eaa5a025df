"""llama.cpp / repeng control vectors: export → import round trip, independent GGUF files, the
layer-index convention (direction.N = output of 0-based layer N = layers.N.resid_post), errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastpatch as fp
from fastpatch.files.gguf_io import direction_index, read_gguf

gguf = pytest.importorskip("gguf")

D = 16


def _write_gguf(path, tensors, *, arch="controlvector", hint="llama", layer_count=None, int32_count=True,
                tensor_dtype=np.float32):
    """A control vector written with GGUFWriter directly (as llama.cpp's cvec-generator / repeng do)."""
    w = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        w.add_string(f"{arch}.model_hint", hint)
    n = len(tensors) if layer_count is None else layer_count
    (w.add_int32 if int32_count else w.add_uint32)(f"{arch}.layer_count", n)
    for name, arr in tensors.items():
        w.add_tensor(name, np.asarray(arr, dtype=tensor_dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_site_to_direction_index():
    assert direction_index("layers.1.resid_post") == 1
    assert direction_index("layers.7.resid_post") == 7
    assert direction_index("layers.4.resid_pre") == 3  # layer 3's output
    for site in ("layers.0.resid_post", "layers.0.resid_pre", "layers.1.resid_pre"):
        with pytest.raises(ValueError, match="layer 0"):
            direction_index(site)
    with pytest.raises(ValueError, match="resid_post"):
        direction_index("layers.3.resid_mid")


def test_export_import_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    v1, v3 = torch.randn(D, generator=g), torch.randn(D, generator=g, dtype=torch.float64)
    mapping = {"layers.1.resid_post": fp.Steer(v1, 2.0),
               "layers.4.resid_pre": fp.Scoped(fp.Steer(v3, -0.5), "all"),  # = layers.3.resid_post
               "layers.2.resid_post": None}
    path = fp.export_gguf(mapping, tmp_path / "cv.gguf", model_hint="llama", scale=1.5)
    info = read_gguf(path)
    assert info["model_hint"] == "llama" and info["layer_count"] == 2
    assert sorted(info["directions"]) == [1, 3]
    back = fp.import_gguf(path)
    assert list(back) == ["layers.1.resid_post", "layers.3.resid_post"]
    torch.testing.assert_close(back["layers.1.resid_post"].v, (v1 * 2.0 * 1.5).float(), rtol=0, atol=0)
    torch.testing.assert_close(back["layers.3.resid_post"].v, (v3 * -0.5 * 1.5).float(), rtol=0, atol=0)
    # float32 vectors at scale 1 come back bit-exact
    exact = fp.import_gguf(fp.export_gguf({"layers.2.resid_post": fp.Steer(v1)}, tmp_path / "e.gguf"))
    assert torch.equal(exact["layers.2.resid_post"].v, v1) and exact["layers.2.resid_post"].scale == 1.0
    scaled = fp.import_gguf(path, scale=3.0)
    assert scaled["layers.1.resid_post"].scale == 3.0


def test_composed_steering_exports(tmp_path):
    a, b = fp.Steer(torch.ones(D)), fp.Steer(torch.arange(D, dtype=torch.float32))
    path = fp.export_gguf({"layers.1.resid_post": fp.compose(a, b), "layers.2.resid_post": a + b},
                          tmp_path / "c.gguf")
    back = fp.import_gguf(path)
    assert torch.equal(back["layers.1.resid_post"].v, back["layers.2.resid_post"].v)


def test_import_independent_gguf(tmp_path):
    # as llama.cpp's cvec-generator writes it: int32 layer_count, direction.1 .. direction.{n-1}
    g = np.random.default_rng(0)
    dirs = {f"direction.{n}": g.standard_normal(D).astype(np.float32) for n in (1, 2, 5)}
    path = _write_gguf(tmp_path / "ext.gguf", dirs, layer_count=5)
    info = read_gguf(path)
    assert info["model_hint"] == "llama" and info["layer_count"] == 5
    mapping = fp.import_gguf(path, scale=0.5)
    assert list(mapping) == ["layers.1.resid_post", "layers.2.resid_post", "layers.5.resid_post"]
    for n in (1, 2, 5):
        s = mapping[f"layers.{n}.resid_post"]
        assert isinstance(s, fp.Steer) and s.scale == 0.5 and s.v.dtype == torch.float32
        assert np.array_equal(s.v.numpy(), dirs[f"direction.{n}"])
    # repeng's variant: uint32 layer_count, no model hint
    path2 = _write_gguf(tmp_path / "repeng.gguf", {"direction.3": np.ones(D)}, hint=None, int32_count=False)
    assert read_gguf(path2)["model_hint"] is None and list(fp.import_gguf(path2)) == ["layers.3.resid_post"]


def test_llamacpp_convention_matches_adding_to_layer_output(tmp_path):
    """direction.N imported at layers.N.resid_post == adding it to decoder layer N's output (llama.cpp's
    build_cvec(cur, il) after the layer's FFN residual add)."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    v = torch.randn(32) * 3
    path = _write_gguf(tmp_path / "cv.gguf", {"direction.2": v.numpy()})
    x = torch.randint(0, 64, (1, 5))

    def add_v(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out + v
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    hook = model.model.layers[2].register_forward_hook(add_v)
    with torch.no_grad():
        expected = model(x).logits
    hook.remove()
    with torch.no_grad(), fp.apply(model, fp.import_gguf(path, model=model)):
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, expected, atol=1e-3)  # the vector does something


def test_export_refuses_non_steering(tmp_path):
    v = torch.ones(D)
    cases = [
        ({"layers.1.resid_post": fp.Ablate(v)}, "not a steering vector"),
        ({"layers.1.resid_post": fp.Gated(fp.Steer(v), v, 0.1)}, "gated"),
        ({"layers.1.resid_post": fp.Scoped(fp.Steer(v), "prompt")}, "scope 'prompt'"),
        ({"layers.1.resid_post": [fp.Steer(v), fp.Steer(v)]}, "no lists or banks"),
        ({"layers.1.resid_post": fp.PatchBank([fp.Steer(v)])}, "no lists or banks"),
        ({"layers.0.resid_post": fp.Steer(v)}, "layer 0"),
        ({"layers.2.resid_mid": fp.Steer(v)}, "resid_post"),
        ({"layers.2.resid_post": fp.Steer(v), "layers.3.resid_pre": fp.Steer(v)}, "steered twice"),
        ({"layers.2.resid_post": None}, "no steering vectors"),
    ]
    for mapping, match in cases:
        with pytest.raises(ValueError, match=match):
            fp.export_gguf(mapping, tmp_path / "x.gguf")


def test_import_refuses_broken_control_vectors(tmp_path):
    ok = {"direction.1": np.ones(D)}
    cases = [
        (_write_gguf(tmp_path / "zero.gguf", {"direction.0": np.ones(D)}), "direction.0 is invalid"),
        (_write_gguf(tmp_path / "arch.gguf", ok, arch="llama"), "not a control vector"),
        (_write_gguf(tmp_path / "f16.gguf", ok, tensor_dtype=np.float16), "expected F32"),
        (_write_gguf(tmp_path / "name.gguf", {"dir.1": np.ones(D)}), "not named direction"),
        (_write_gguf(tmp_path / "2d.gguf", {"direction.1": np.ones((2, D))}), "1-D"),
        (_write_gguf(tmp_path / "size.gguf", {"direction.1": np.ones(D), "direction.2": np.ones(D + 1)}),
         "elements"),
        (_write_gguf(tmp_path / "nan.gguf", {"direction.1": np.full(D, np.nan)}), "NaN"),
    ]
    for path, match in cases:
        with pytest.raises(fp.PatchFileError, match=match):
            fp.import_gguf(path)
    data = _write_gguf(tmp_path / "good.gguf", ok).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(fp.PatchFileError, match="GGUF"):
        fp.import_gguf(tmp_path / "cut.gguf")


def test_import_checks_model(tmp_path):
    from models import tiny_model

    model = tiny_model("llama")  # hidden 64, 2 layers
    with pytest.raises(fp.PatchFileError, match="hidden size is 64"):
        fp.import_gguf(_write_gguf(tmp_path / "a.gguf", {"direction.1": np.ones(D)}), model=model)
    with pytest.raises(fp.PatchFileError, match="past the model"):
        fp.import_gguf(_write_gguf(tmp_path / "b.gguf", {"direction.5": np.ones(64)}), model=model)
