"""Bad input to the vLLM plugin gets a clear error before anything runs: the config section, patch files
that do not fit the model, slots, architectures; and one real engine start refused for a foreign file."""
from __future__ import annotations

import pytest
import torch

import fastpatch
from vllm_common import one_torch_thread  # noqa: F401 (autouse fixture)
from vllm_common import engine, smollm2_folder, vllm_or_skip


@pytest.fixture(scope="module")
def smol():
    from fastpatch.app.models import load_smollm2

    hf, _ = load_smollm2()
    return hf, fastpatch.fingerprint(hf)


def test_config_errors():
    from fastpatch.integrations.vllm import FastpatchConfigError, parse

    with pytest.raises(FastpatchConfigError, match="unknown option.*'patchs'"):
        parse({"patchs": {}})
    with pytest.raises(FastpatchConfigError, match="norm must be one of"):
        parse({"patches": {"a": "a.safetensors"}, "norm": "fast"})
    with pytest.raises(FastpatchConfigError, match="no patches and no spare_slots"):
        parse({"patches": {}})
    with pytest.raises(FastpatchConfigError, match="spare_slots"):
        parse({"patches": {"a": "x"}, "spare_slots": -1})
    with pytest.raises(FastpatchConfigError, match="names are non-empty"):
        parse({"patches": {"": "x"}})
    conf = parse({"patches": {"a": "x"}, "spare_slots": 2, "sites": ["layers.1.resid_post"]})
    assert conf.capacity == 3 and conf.norm == "exact"


def test_checkpoint_fingerprint_equals_the_hf_fingerprint(smol):
    """The worker fingerprints the checkpoint folder without HF's model; it must agree with fastpatch.fingerprint."""
    vllm_or_skip()
    from types import SimpleNamespace

    import transformers as tf
    from fastpatch.integrations.vllm.checkpoint import model_fingerprint

    hf, fp = smol
    folder = smollm2_folder()
    got = model_fingerprint(SimpleNamespace(hf_config=tf.AutoConfig.from_pretrained(folder), model=folder,
                                            dtype=torch.float32))
    from fastpatch.files.fingerprint import COMPARED_FIELDS

    assert {f: got[f] for f in COMPARED_FIELDS} == {f: fp[f] for f in COMPARED_FIELDS}


def test_files_that_do_not_fit_the_model(smol, tmp_path):
    from fastpatch.files.patch_file import ModelMismatchError
    from fastpatch.integrations.vllm import PatchSlotError
    from fastpatch.integrations.vllm.slots import read_patches

    hf, fp = smol
    d = hf.config.hidden_size
    foreign = dict(fp, weights_sha256="0" * 64)
    p = fastpatch.save({"layers.1.resid_post": fastpatch.Steer(torch.ones(d))}, tmp_path / "f.safetensors",
                       model=foreign)
    with pytest.raises(ModelMismatchError, match="different model.*weights_sha256"):
        read_patches(p, fp, 30)
    assert read_patches(p, fp, 30, force=True)  # force: loaded anyway (with a warning)
    small = fastpatch.save({"layers.1.resid_post": fastpatch.Steer(torch.ones(64))}, tmp_path / "s.safetensors")
    with pytest.raises(Exception, match="hidden size"):
        from fastpatch.integrations.vllm.slots import SlotTable

        SlotTable({"s": read_patches(small, None, 30)}, hidden_size=d, num_layers=30, capacity=1, max_rank=None,
                  sites=None, dtype=torch.float32, device="cpu")
    far = fastpatch.save({"layers.40.resid_post": fastpatch.Steer(torch.ones(d))}, tmp_path / "far.safetensors")
    with pytest.raises(PatchSlotError, match="layer 40 is out of range"):
        read_patches(far, None, 30)
    scoped = fastpatch.save({"layers.1.resid_post": fastpatch.Scoped(fastpatch.Steer(torch.ones(d)), "prompt")},
                            tmp_path / "scoped.safetensors")
    with pytest.raises(PatchSlotError, match="position scope 'prompt'"):
        read_patches(scoped, None, 30)
    two = fastpatch.save({"layers.1.resid_post": [fastpatch.Steer(torch.ones(d)), fastpatch.Steer(torch.zeros(d))]},
                         tmp_path / "two.safetensors")
    with pytest.raises(PatchSlotError, match="one patch per site"):
        read_patches(two, None, 30)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_patches(tmp_path / "missing.safetensors", None, 30)


def test_slot_table_limits():
    from fastpatch.integrations.vllm import PatchSlotError
    from fastpatch.integrations.vllm.slots import SlotTable

    d = 8
    steer = {("post", 1): fastpatch.Steer(torch.ones(d)).canonical()}
    low = {("post", 1): fastpatch.LowRank(torch.ones(d, 3), torch.ones(3, d)).canonical()}
    t = SlotTable({"a": steer}, hidden_size=d, num_layers=2, capacity=2, max_rank=2, sites=None,
                  dtype=torch.float32, device="cpu")
    assert t.banks[("post", 1)].down.shape == (2, 2, d)
    with pytest.raises(PatchSlotError, match="rank 3 .* max_rank 2"):
        t.write("b", low)
    assert t.write("b", steer) == 1
    with pytest.raises(PatchSlotError, match="all 2 slots are full"):
        t.write("c", steer)
    with pytest.raises(PatchSlotError, match="unknown fastpatch patch 'zz'"):
        t.slot("zz")
    t.remove("a")
    assert t.write("c", steer) == 0
    assert torch.equal(t.banks[("post", 1)].shift[0], torch.ones(d))


def test_unsupported_architecture_names_what_works():
    from fastpatch.integrations.vllm import UnsupportedModelError
    from fastpatch.integrations.vllm.model import decoder

    class GPT2LMHeadModel(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="does not support GPT2LMHeadModel.*LlamaForCausalLM"):
        decoder(GPT2LMHeadModel())


def test_engine_start_refuses_a_file_fitted_on_another_model(smol, tmp_path):
    vllm_or_skip()
    hf, fp = smol
    p = fastpatch.save({"layers.1.resid_post": fastpatch.Steer(torch.ones(hf.config.hidden_size))},
                       tmp_path / "foreign.safetensors", model=dict(fp, config_sha256="1" * 64))
    with pytest.raises(Exception, match="fitted on a different model"):
        engine(smollm2_folder(), {"patches": {"foreign": str(p)}})
