"""fastpatch.save / fastpatch.load: round trips, model fingerprints, and every kind of broken file."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastpatch as fp
from fastpatch.files.patch_file import KEY_FORMAT_VERSION, KEY_MANIFEST, payload_sha256
from casegen import KINDS, make_patch
from models import tiny_model

D = 64  # the tiny models' hidden size


def _all_kinds_mapping(seed=0, bank_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    ps = {k: make_patch(k, D, g, rank=3) for k in KINDS}
    cond = torch.randn(D, generator=g, dtype=torch.float64)
    return {
        "layers.0.resid_pre": ps["steer"],
        "layers.0.resid_mid": fp.Gated(ps["lowrank"], cond, 0.05, metric="projection", fire="below"),
        "layers.0.resid_post": fp.Scoped([ps["ablate"], ps["clamp"]], "f3+l2"),
        "layers.1.resid_mid": fp.PatchBank([ps["loreft"], fp.compose(ps["ablate"], ps["steer"]),
                                            fp.Steer(torch.randn(D, generator=g).to(torch.bfloat16), 0.5)],
                                           dtype=bank_dtype),
        "layers.1.resid_post": fp.Scoped(fp.compose(fp.Gated(ps["ablate"], cond, 0.1),
                                                    fp.Gated(ps["steer"], cond, 0.1)), "prompt"),
    }


def _assert_same_patch(a, b):
    assert type(a) is type(b)
    if isinstance(a, fp.Gated):
        assert (a.threshold, a.metric, a.fire) == (b.threshold, b.metric, b.fire)
        assert a.condition.dtype == b.condition.dtype and torch.equal(a.condition, b.condition)
        return _assert_same_patch(a.patch, b.patch)
    if isinstance(a, fp.CanonicalPatch):
        assert a.kind == b.kind and a.params == b.params
        for f in ("down", "bias", "up", "shift"):
            ta, tb = getattr(a, f), getattr(b, f)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), f
        assert (a.gate is None) == (b.gate is None)
        if a.gate is not None:
            assert a.gate.same_as(b.gate)
        return
    for f in ("v", "u", "A", "B", "bias", "R", "W", "b"):
        ta, tb = getattr(a, f, None), getattr(b, f, None)
        assert (ta is None) == (tb is None), f
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), f  # bit-exact, same dtype
    for f in ("scale", "value"):
        assert getattr(a, f, None) == getattr(b, f, None)


def _assert_same_value(a, b):
    assert type(a) is type(b)
    if isinstance(a, fp.Scoped):
        assert a.scope == b.scope
        return _assert_same_value(a.patch, b.patch)
    if isinstance(a, fp.PatchBank):
        assert a.dtype == b.dtype and a.num_patches == b.num_patches
        for pa, pb in zip(a.patches, b.patches):
            _assert_same_patch(pa, pb)
        for k, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[k]), k
        return
    if isinstance(a, list):
        assert len(a) == len(b)
        for pa, pb in zip(a, b):
            _assert_same_patch(pa, pb)
        return
    if a is not None:
        _assert_same_patch(a, b)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_round_trip_all_kinds(tmp_path, model):
    mapping = _all_kinds_mapping()
    mapping["layers.1.resid_pre"] = None  # an explicit "no patch" entry survives too
    del mapping["layers.0.resid_post"]  # layers.1.resid_pre is the same point
    path = fp.save(mapping, tmp_path / "set.safetensors", model=model, name="all-kinds", version="1.2.3-rc.1",
                   author="tester", description="every kind")
    loaded = fp.load(path, model=model)
    assert list(loaded) == list(mapping)  # site order kept
    for site in mapping:
        _assert_same_value(mapping[site], loaded[site])
    g = torch.Generator().manual_seed(9)
    h = torch.randn(32, D, generator=g, dtype=torch.float64)
    p0, p1 = mapping["layers.0.resid_mid"], loaded["layers.0.resid_mid"]
    assert torch.equal(p0.apply(h), p1.apply(h))


def test_loaded_mapping_is_what_apply_takes(tmp_path, model):
    mapping = _all_kinds_mapping(bank_dtype=torch.float32)  # apply takes float32 banks on a float32 model
    path = fp.save(mapping, tmp_path / "set.safetensors", model=model, name="x")
    loaded = fp.load(path, model=model)
    ids = torch.tensor([0, -1])  # patch 0 of every site for sequence 0, none for sequence 1
    x = torch.randint(0, 128, (2, 7))
    outs = []
    for m in (mapping, loaded):
        with fp.apply(model, m) as handle:
            handle.select(ids)
            with torch.no_grad():
                outs.append(model(x).logits)
    assert torch.equal(outs[0], outs[1])


def test_manifest_contents(tmp_path, model):
    path = fp.save(_all_kinds_mapping(), tmp_path / "m.safetensors", model=model, name="demo", version="0.3.0",
                   author="a", description="d")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["fastpatch.format"] == "fastpatch-patch-set" and meta[KEY_FORMAT_VERSION] == "1"
    m = json.loads(meta[KEY_MANIFEST])
    assert (m["name"], m["version"], m["author"], m["description"]) == ("demo", "0.3.0", "a", "d")
    assert m["created"].endswith("Z") and m["hidden_size"] == D
    assert m["model"] == fp.fingerprint(model)
    assert m["model"]["num_layers"] == 2 and m["model"]["hidden_size"] == D
    site = m["sites"]["layers.1.resid_post"]
    assert site["scope"] == "prompt" and site["patches"][0]["parts"] == ["ablate", "steer"]
    assert site["patches"][0]["gate"]["metric"] == "cosine"
    assert m["sites"]["layers.1.resid_mid"]["container"] == "bank"
    assert m["sites"]["layers.1.resid_mid"]["bank_dtype"] == "bfloat16"


def test_save_refuses_bad_arguments(tmp_path, model):
    s = fp.Steer(torch.ones(D))
    with pytest.raises(ValueError, match="semantic version"):
        fp.save({"layers.0.resid_post": s}, tmp_path / "a.safetensors", version="1.0")
    with pytest.raises(ValueError, match="unknown site"):
        fp.save({"layer0": s}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="past the model"):
        fp.save({"layers.5.resid_post": s}, tmp_path / "a.safetensors", model=model)
    with pytest.raises(ValueError, match="hidden size"):
        fp.save({"layers.0.resid_post": fp.Steer(torch.ones(8))}, tmp_path / "a.safetensors", model=model)
    with pytest.raises(TypeError, match="Conditional"):
        cond = fp.cast.Condition(torch.ones(D), site="layers.0.resid_post", threshold=0.1)
        fp.save({"layers.1.resid_post": fp.cast.Conditional(s, cond)}, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


# -- model fingerprints -------------------------------------------------------------------------

def test_fingerprint_fields_and_stability(model):
    f = fp.fingerprint(model)
    assert f["model_type"] == "llama" and f["hidden_size"] == D and f["num_layers"] == 2
    assert f["dtype"] == "float32"
    assert fp.fingerprint(tiny_model("llama")) == f  # same seed, same model
    bf = fp.fingerprint(tiny_model("llama").to(torch.bfloat16))
    assert bf["dtype"] == "bfloat16" and {k: v for k, v in bf.items() if k != "dtype"} == \
        {k: v for k, v in f.items() if k != "dtype"}


def test_load_refuses_other_model_and_says_what_differs(tmp_path, model):
    path = fp.save({"layers.1.resid_post": fp.Steer(torch.ones(D))}, tmp_path / "s.safetensors", model=model)
    other_weights = tiny_model("llama", seed=1)
    with pytest.raises(fp.ModelMismatchError, match="weights_sha256") as e:
        fp.load(path, model=other_weights)
    assert "config_sha256" not in str(e.value) and "force=True" in str(e.value)
    with pytest.raises(fp.ModelMismatchError, match=r"model_type: file has 'llama', model has 'gemma'"):
        fp.load(path, model=tiny_model("gemma"))
    with pytest.warns(UserWarning, match="force=True"):
        loaded = fp.load(path, model=other_weights, force=True)
    assert isinstance(loaded["layers.1.resid_post"], fp.Steer)
    # a different dtype is the same model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.load(path, model=tiny_model("llama").to(torch.bfloat16))


def test_load_checks_against_a_fingerprint_dict(tmp_path, model):
    path = fp.save({"layers.0.resid_post": fp.Steer(torch.ones(D))}, tmp_path / "s.safetensors", model=model)
    fpd = dict(fp.fingerprint(model), hidden_size=128)
    with pytest.raises(fp.ModelMismatchError, match="hidden_size: file has 64, model has 128"):
        fp.load(path, model=fpd)


# -- broken files -------------------------------------------------------------------------------

def _saved(tmp_path, model):
    g = torch.Generator().manual_seed(3)
    mapping = {"layers.0.resid_post": fp.Steer(torch.randn(D, generator=g), 2.0),
               "layers.1.resid_mid": fp.Gated(
                   fp.LowRank(torch.randn(D, 2, generator=g), torch.randn(2, D, generator=g)),
                   torch.randn(D, generator=g), 0.2)}
    return fp.save(mapping, tmp_path / "good.safetensors", model=model, name="good", version="1.0.0")


def _rewrite(src, dst, *, tensors=None, manifest=None, metadata=None, rehash=True):
    """Hand-edit a patch file: change tensors / manifest / metadata, optionally fix the payload hash."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    man = json.loads(meta[KEY_MANIFEST])
    if tensors:
        tensors(ts)
    if manifest:
        manifest(man)
    if rehash:
        man["payload_sha256"] = payload_sha256(ts)
    meta[KEY_MANIFEST] = json.dumps(man)
    if metadata:
        metadata(meta)
    save_file(ts, str(dst), metadata=meta)
    return dst


def _expect_error(path, match, model=None):
    with pytest.raises(fp.PatchFileError, match=match):
        fp.load(path, model=model)


def test_good_file_loads(tmp_path, model):
    assert set(fp.load(_saved(tmp_path, model), model=model)) == {"layers.0.resid_post", "layers.1.resid_mid"}


def test_truncated_file(tmp_path, model):
    data = _saved(tmp_path, model).read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        _expect_error(bad, "truncated")


def test_corrupted_tensor_bytes_fail_the_hash(tmp_path, model):
    good = _saved(tmp_path, model)
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x40  # flip a bit in the last tensor's data
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    _expect_error(bad, "hash mismatch")


def test_corrupted_header(tmp_path, model):
    data = bytearray(_saved(tmp_path, model).read_bytes())
    data[9] = ord("#")  # inside the header JSON
    bad = tmp_path / "hdr.safetensors"
    bad.write_bytes(bytes(data))
    _expect_error(bad, "header")


def test_bad_manifest_json(tmp_path, model):
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "json.safetensors",
                   metadata=lambda m: m.update({KEY_MANIFEST: m[KEY_MANIFEST][:-7]}))
    _expect_error(bad, "not valid JSON")


def test_missing_tensor(tmp_path, model):
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "missing.safetensors",
                   tensors=lambda ts: ts.pop("layers.1.resid_mid.0.patch.B"))
    _expect_error(bad, r"missing tensor 'layers.1.resid_mid.0.patch.B'")


def test_wrong_shape(tmp_path, model):
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "shape.safetensors",
                   tensors=lambda ts: ts.update({"layers.0.resid_post.0.v": torch.ones(D + 1)}))
    _expect_error(bad, r"'layers.0.resid_post.0.v' has shape \(65,\), expected \(64,\)")


def test_nan_values(tmp_path, model):
    def poison(ts):
        ts["layers.1.resid_mid.0.condition"][5] = float("nan")
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "nan.safetensors", tensors=poison)
    _expect_error(bad, "NaN")


def test_nan_in_manifest_number(tmp_path, model):
    good = _saved(tmp_path, model)
    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    meta[KEY_MANIFEST] = meta[KEY_MANIFEST].replace('"scale": 2.0', '"scale": NaN')
    save_file(ts, str(tmp_path / "nanjson.safetensors"), metadata=meta)
    _expect_error(tmp_path / "nanjson.safetensors", "not valid JSON")


def test_hash_mismatch(tmp_path, model):
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "hash.safetensors", rehash=False,
                   manifest=lambda m: m.update(payload_sha256="0" * 64))
    _expect_error(bad, "hash mismatch")
    # changing a tensor without fixing the hash is caught too
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "hash2.safetensors", rehash=False,
                   tensors=lambda ts: ts["layers.0.resid_post.0.v"].mul_(2))
    _expect_error(bad, "hash mismatch")


def test_unknown_format_version(tmp_path, model):
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "v2.safetensors",
                   metadata=lambda m: m.update({KEY_FORMAT_VERSION: "2"}))
    _expect_error(bad, "unknown format version '2'")
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "v2m.safetensors",
                   manifest=lambda m: m.update(format_version=7))
    _expect_error(bad, "unknown format version 7")


def test_hand_edited_fields(tmp_path, model):
    good = _saved(tmp_path, model)
    cases = [
        (lambda m: m.update(version="one"), "semantic version"),
        (lambda m: m.update(name=""), "'name'"),
        (lambda m: m.update(created="yesterday"), "'created'"),
        (lambda m: m["sites"]["layers.0.resid_post"]["patches"][0].update(kind="warp"), "unknown patch kind 'warp'"),
        (lambda m: m["sites"]["layers.0.resid_post"].update(scope="middle"), "bad scope"),
        (lambda m: m["sites"]["layers.1.resid_mid"]["patches"][0]["gate"].update(metric="l2"), "'metric'"),
        (lambda m: m["sites"]["layers.0.resid_post"]["patches"][0]["params"].update(scale="big"), "'scale'"),
        (lambda m: m["sites"].update({"layers.9.resid_post": m["sites"].pop("layers.0.resid_post")}),
         "past the model"),
    ]
    for i, (edit, match) in enumerate(cases):
        _expect_error(_rewrite(good, tmp_path / f"edit{i}.safetensors", manifest=edit), match)


def test_extra_tensor(tmp_path, model):
    bad = _rewrite(_saved(tmp_path, model), tmp_path / "extra.safetensors",
                   tensors=lambda ts: ts.update(smuggled=torch.zeros(3)))
    _expect_error(bad, "not referenced")


def test_not_a_patch_file(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    _expect_error(tmp_path / "plain.safetensors", "not a fastpatch patch file")
    _expect_error(tmp_path / "nothing.safetensors", "cannot read")
    fp.export_gguf({"layers.1.resid_post": fp.Steer(torch.ones(D))}, tmp_path / "cv.gguf")
    _expect_error(tmp_path / "cv.gguf", "import_gguf")


def test_failed_load_changes_nothing_already_loaded(tmp_path, model):
    good = _saved(tmp_path, model)
    loaded = fp.load(good, model=model)
    x = torch.randint(0, 128, (1, 6))
    handle = fp.apply(model, loaded)
    try:
        with torch.no_grad():
            before = model(x).logits
        data = good.read_bytes()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(data[:-10])
        with pytest.raises(fp.PatchFileError):
            handle.swap(fp.load(bad, model=model))
        assert handle.patches == loaded
        with torch.no_grad():
            assert torch.equal(model(x).logits, before)
    finally:
        handle.remove()
