"""fastpatch together with the public interpretability libraries (issue 12: defect 1 in the wild, and
applying fastpatch under a wrapper). Each case runs the library on a fastpatch-patched model and
compares with the same library on the plain model plus an independent plain-torch hook for
fastpatch's own patch. Libraries (install with ``pip install --no-deps``, see scripts/install.sh):
steering-vectors 0.12.2, repeng 0.4.0, pyvene 0.1.8, nnsight 0.8.1; each test skips without its
library.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastpatch as fp
from fastpatch.integrations.hf import UnsupportedModelError
from models import tiny_model

D = 64
MODES = ("no_grad", "inference_mode")


def need(name: str):
    try:
        if name == "repeng":
            import numpy as np
            if not hasattr(np, "float_"):  # repeng 0.4.0 uses np.float_, gone in numpy 2
                np.float_ = np.float64
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a missing transitive dependency
        pytest.skip(f"{name} is not usable here ({type(exc).__name__}: {exc}); see scripts/install.sh")


_CHILD = "FASTPATCH_TEST_INTEROP_CHILD"
_CHILD_RESULTS: dict = {}


def in_a_child(request) -> bool:
    """Importing nnsight 0.8 (pyvene imports it too) changes the whole process: every object gets a
    ``save`` attribute and ``torch.Tensor.backward`` is replaced by one that parses its caller's source,
    so later tests in the same process fail (vLLM's worker-extension check, backward from exec'd code).
    The pyvene and nnsight tests therefore run together in one child pytest; in the parent each test
    reports its own outcome from the child's junit XML."""
    if os.environ.get(_CHILD) == "1":
        return False
    if not _CHILD_RESULTS:
        import tempfile
        import xml.etree.ElementTree as ET

        root = Path(__file__).resolve().parents[3]
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / "child.xml"
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                 "-k", "pyvene or nnsight", f"--junitxml={xml}"],
                cwd=root, env=dict(os.environ, **{_CHILD: "1"}), capture_output=True, text=True, timeout=900)
            if not xml.exists():
                pytest.fail(f"the child pytest wrote no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
            for case in ET.parse(xml).iter("testcase"):
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                skipped = case.find("skipped")
                _CHILD_RESULTS[case.get("name")] = (
                    ("failed", (bad.get("message") or "") + "\n" + (bad.text or "")[-3000:]) if bad is not None
                    else ("skipped", skipped.get("message") or "") if skipped is not None else ("passed", ""))
    outcome, detail = _CHILD_RESULTS.get(request.node.name, ("missing", "the child did not run this test"))
    if outcome == "skipped":
        pytest.skip(detail)
    if outcome != "passed":
        pytest.fail(f"{request.node.name} in the child pytest: {outcome}\n{detail}")
    return True


def grad_mode(mode):
    return torch.inference_mode() if mode == "inference_mode" else torch.no_grad()


def ids():
    return torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def vec(seed, scale=1.0):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed)) * scale


STEER = vec(1, 2.0)  # fastpatch's own patch: Steer at layers.1.resid_post


def fastpatch_patch():
    return {"layers.1.resid_post": fp.Steer(STEER)}


@contextlib.contextmanager
def oracle_patch(model):
    """fastpatch_patch() as a plain torch hook on the plain model (registered first: fastpatch applies
    its patch inside the layer, before any forward hook of the layer runs)."""
    h = model.model.layers[1].register_forward_hook(lambda m, a, o: o + STEER)
    try:
        yield
    finally:
        h.remove()


def close(got, ref, what):
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-4, atol=1e-4, msg=what)


@pytest.mark.parametrize("mode", MODES)
def test_steering_vectors_on_a_patched_model(mode):
    sv = need("steering_vectors")
    model = tiny_model("llama")
    x = ids()
    vector = sv.SteeringVector(layer_activations={0: vec(2), 1: vec(3)}, layer_type="decoder_block")

    def run():
        with vector.apply(model, multiplier=1.5), grad_mode(mode):  # edits the layer outputs in place
            return model(input_ids=x).logits.clone()

    with oracle_patch(model):
        ref = run()
    with fp.patched(model, fastpatch_patch()):
        got = run()
    close(got, ref, f"steering-vectors {mode}")
    with grad_mode(mode):
        plain = model(input_ids=x).logits
    assert (ref - plain).abs().max() > 0.1  # the steering vector does something


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_repeng_control_model_on_a_patched_model(mode, inplace):
    repeng = need("repeng")
    model = tiny_model("llama")
    x = ids()
    operator = (lambda cur, ctl: cur.add_(ctl)) if inplace else (lambda cur, ctl: cur + ctl)

    def run():
        cm = repeng.ControlModel(model, [0])  # puts a ControlModule wrapper into the layer list
        try:
            cm.set_raw_control({0: vec(4, 3.0)}, operator=operator)
            with grad_mode(mode):
                # repeng's mask needs explicit [B, S] position ids in a plain batched forward
                pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
                return cm(input_ids=x, position_ids=pos).logits.clone()
        finally:
            cm.unwrap()

    with oracle_patch(model):
        ref = run()
    with fp.patched(model, fastpatch_patch()):
        got = run()
    close(got, ref, f"repeng {mode} inplace={inplace}")


def test_fastpatch_after_repeng_is_refused_with_a_reason():
    repeng = need("repeng")
    model = tiny_model("llama")
    cm = repeng.ControlModel(model, [1])
    try:
        with pytest.raises(UnsupportedModelError, match="repeng"):
            fp.apply(model, fastpatch_patch())
    finally:
        cm.unwrap()


@pytest.mark.parametrize("mode", MODES)
def test_pyvene_on_a_patched_model_and_fastpatch_under_pyvene(mode, request):
    if in_a_child(request):
        return
    pv = need("pyvene")
    model = tiny_model("llama")
    x = ids()
    w = vec(5, 2.0)

    def wrapper(with_oracle_patch=False):
        reps = [{"component": "model.layers[0].output", "intervention": lambda b, s: b + w}]
        if with_oracle_patch:  # pyvene removes every hook of the model before each call: the oracle for
            # fastpatch's patch is a second pyvene intervention, not a hook
            reps.append({"component": "model.layers[1].output", "intervention": lambda b, s: b + STEER})
        return pv.IntervenableModel(reps, model=model)

    def run(pvm):
        with grad_mode(mode):
            _, out = pvm(base={"input_ids": x})
        return out.logits.clone()

    ref = run(wrapper(with_oracle_patch=True))
    with fp.patched(model, fastpatch_patch()):
        got = run(wrapper())
    close(got, ref, f"pyvene over fastpatch, {mode}")
    pvm = wrapper()
    with fp.patched(pvm, fastpatch_patch()) as h:  # fastpatch applied to the wrapper patches the model inside
        assert h.model is model
        got2 = run(pvm)
    close(got2, ref, f"fastpatch under pyvene, {mode}")
    with grad_mode(mode):
        plain = model(input_ids=x).logits
    assert (ref - plain).abs().max() > 0.1


@pytest.mark.parametrize("mode", MODES)
def test_nnsight_wrapping_a_patched_model(mode, request):
    if in_a_child(request):
        return
    nnsight = need("nnsight")
    model = tiny_model("llama")
    x = ids()
    w0, w1 = vec(6), vec(7)

    def run(wrapped):
        with grad_mode(mode):
            with wrapped.trace(input_ids=x):
                wrapped.model.layers[0].output[:] += w0  # nnsight's in-place idiom
                wrapped.model.layers[1].output[:] += w1
                out = wrapped.lm_head.output.save()
        return out.clone()

    oracle_model = tiny_model("llama")
    with oracle_patch(oracle_model):
        ref = run(nnsight.NNsight(oracle_model))
    handle = fp.apply(model, fastpatch_patch())  # fastpatch first, nnsight wraps the patched model
    wrapped = nnsight.NNsight(model)
    got = run(wrapped)
    close(got, ref, f"nnsight over fastpatch, {mode}")
    handle.remove()  # leaves nnsight's instrumentation in place; the fused forwards pass through
    plain_ref = run(nnsight.NNsight(tiny_model("llama")))
    close(run(wrapped), plain_ref, "nnsight after handle.remove()")


def test_fastpatch_under_an_existing_nnsight_wrapper(request):
    if in_a_child(request):
        return
    nnsight = need("nnsight")
    model = tiny_model("llama")
    wrapped = nnsight.NNsight(model)
    with pytest.raises(UnsupportedModelError, match="nnsight"):
        fp.apply(wrapped, fastpatch_patch())
    assert all(not getattr(b.__dict__.get("forward"), "_fastpatch", False) for b in model.model.layers)
    x = ids()
    w0 = vec(6)
    with fp.patched(wrapped, fastpatch_patch(), fallback="hooks") as h:  # the hooks implementation composes
        assert h.implementation == "hooks"
        with torch.no_grad():
            with wrapped.trace(input_ids=x):
                wrapped.model.layers[0].output[:] += w0
                got = wrapped.lm_head.output.save()
    oracle_model = tiny_model("llama")
    hk = oracle_model.model.layers[0].register_forward_hook(lambda m, a, o: o + w0)
    with oracle_patch(oracle_model), torch.no_grad():
        ref = oracle_model(input_ids=x).logits
    hk.remove()
    close(got, ref, "fastpatch hooks under nnsight")


def test_pyvene_keeps_select_and_scopes_working(request):
    """pyvene strips all hooks of the model before each call; fastpatch's per-forward step does not
    live in a hook, so per-sequence select and scoped patches still apply under pyvene."""
    if in_a_child(request):
        return
    pv = need("pyvene")
    model = tiny_model("llama")
    x = ids()
    w, a, b = vec(5, 2.0), vec(8, 2.0), vec(9, 2.0)
    pairs = torch.stack([b, a])  # select([1, 0]): row 0 gets patch 1 (b), row 1 patch 0 (a)

    def base_rep():
        return {"component": "model.layers[0].output", "intervention": lambda t, s: t + w}

    oracle = pv.IntervenableModel([base_rep(), {"component": "model.layers[1].output",
                                                "intervention": lambda t, s: t + pairs[:, None, :]}], model=model)
    with torch.no_grad():
        ref = oracle(base={"input_ids": x})[1].logits.clone()
    pvm = pv.IntervenableModel(base_rep(), model=model)
    with fp.patched(model, {"layers.1.resid_post": [fp.Steer(a), fp.Steer(b)]}) as h, torch.no_grad():
        h.select([1, 0])
        got = pvm(base={"input_ids": x})[1].logits.clone()
    close(got, ref, "select under pyvene")
