"""`fastpatch inspect` and `fastpatch convert` through fastpatch.app.cli.main (and once as a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastpatch as fp
from fastpatch.app.cli import main
from models import tiny_model

D = 64


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def mixed_file(tmp_path, model):
    g = torch.Generator().manual_seed(0)
    mapping = {
        "layers.1.resid_post": fp.Steer(torch.randn(D, generator=g), 4.0),
        "layers.0.resid_mid": fp.Scoped(
            fp.Gated(fp.LowRank(torch.randn(D, 3, generator=g), torch.randn(3, D, generator=g)),
                     torch.randn(D, generator=g), 0.25), "f2+l1"),
        "layers.0.resid_post": fp.PatchBank([
            fp.Ablate(torch.randn(D, generator=g)),
            fp.compose(fp.Ablate(torch.randn(D, generator=g)), fp.Steer(torch.ones(D)))]),
    }
    return fp.save(mapping, tmp_path / "mixed.safetensors", model=model, name="mixed-set", version="2.1.0",
                   author="ada", description="a bit of everything")


@pytest.fixture
def steer_file(tmp_path, model):
    g = torch.Generator().manual_seed(1)
    mapping = {"layers.1.resid_post": fp.Steer(torch.randn(D, generator=g), 2.0)}
    return fp.save(mapping, tmp_path / "steer.safetensors", model=model, name="steer", version="1.0.0")


def test_inspect_text(mixed_file, capsys):
    assert main(["inspect", str(mixed_file)]) == 0
    out = capsys.readouterr().out
    for text in ("mixed-set", "2.1.0", "ada", "a bit of everything", "LlamaForCausalLM", "llama", "2 layers",
                 "created:", "config sha256", "weights sha256"):
        assert text in out, text
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("site"))
    assert header.split() == ["site", "kind", "rank", "gate", "scope", "tensors"]
    row = next(line for line in lines if line.startswith("layers.0.resid_mid"))
    assert "lowrank" in row and " 3 " in row and "cosine above 0.25" in row and "f2+l1" in row
    assert "A[64, 3]" in row and "B[3, 64]" in row
    assert any("composed(ablate > steer)" in line and "(bank)" in line for line in lines)
    assert any(line.startswith("layers.1.resid_post") and "steer" in line and "v[64]" in line for line in lines)


def test_inspect_json(mixed_file, capsys, model):
    assert main(["inspect", str(mixed_file), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "mixed-set" and d["version"] == "2.1.0" and d["author"] == "ada"
    assert d["model"] == fp.fingerprint(model)
    rows = {(r["site"], r["index"]): r for r in d["sites"]}
    r = rows[("layers.0.resid_mid", None)]
    assert r["kind"] == "lowrank" and r["rank"] == 3 and r["scope"] == "f2+l1"
    assert r["gate"] == {"metric": "cosine", "fire": "above", "threshold": 0.25}
    assert r["shapes"] == {"A": [64, 3], "B": [3, 64]}
    assert rows[("layers.0.resid_post", 1)]["container"] == "bank"


def test_inspect_reports_broken_file(tmp_path, steer_file, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(steer_file.read_bytes()[:-5])
    assert main(["inspect", str(bad)]) == 1
    assert "truncated" in capsys.readouterr().err


def test_convert_to_gguf_and_back(tmp_path, steer_file, capsys):
    gguf_path = tmp_path / "steer.gguf"
    assert main(["convert", str(steer_file), str(gguf_path), "--scale", "0.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    from fastpatch.files.gguf_io import read_gguf

    info = read_gguf(gguf_path)
    assert info["model_hint"] == "llama"  # from the recorded fingerprint
    original = fp.load(steer_file)["layers.1.resid_post"]
    torch.testing.assert_close(info["directions"][1], (original.v * 2.0 * 0.5).float(), rtol=0, atol=0)

    assert main(["convert", str(gguf_path), str(tmp_path / "x.gguf.safetensors"), "--model-hint", "x"]) == 0
    assert main(["convert", str(steer_file), str(tmp_path / "hint.gguf"), "--model-hint", "smollm2"]) == 0
    assert read_gguf(tmp_path / "hint.gguf")["model_hint"] == "smollm2"

    back = tmp_path / "back.safetensors"
    assert main(["convert", str(gguf_path), str(back), "--name", "from-gguf", "--version", "3.0.0",
                 "--author", "bob", "--scale", "2"]) == 0
    loaded = fp.load(back)
    s = loaded["layers.1.resid_post"]
    assert s.scale == 2.0 and torch.equal(s.v, info["directions"][1])
    capsys.readouterr()
    assert main(["inspect", str(back), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["name"], d["version"], d["author"]) == ("from-gguf", "3.0.0", "bob")
    assert main(["inspect", str(gguf_path)]) == 0
    out = capsys.readouterr().out
    assert "control vector" in out and "layers.1.resid_post" in out


def test_convert_errors(tmp_path, mixed_file, steer_file, capsys):
    assert main(["convert", str(mixed_file), str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "layers.1.resid_post" not in err  # names the offending site, not a good one
    assert "site 'layers.0.resid_mid'" in err or "site 'layers.0.resid_post'" in err
    assert main(["convert", str(steer_file), str(tmp_path / "out.txt")]) == 1
    assert "unknown extension" in capsys.readouterr().err
    assert main(["convert", str(steer_file), str(tmp_path / "same.safetensors")]) == 1
    assert "both" in capsys.readouterr().err
    gguf_path = tmp_path / "ok.gguf"
    assert main(["convert", str(steer_file), str(gguf_path)]) == 0
    assert main(["convert", str(gguf_path), str(tmp_path / "v.safetensors"), "--version", "1.0"]) == 1
    assert "semantic version" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"fastpatch {command} " in out


def test_inspect_as_subprocess(mixed_file):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fastpatch", "inspect", str(mixed_file)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mixed-set" in proc.stdout and "layers.0.resid_mid" in proc.stdout
