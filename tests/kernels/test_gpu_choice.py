"""The per-shape backend choice on CUDA (``backends.choose_cuda`` / ``PerShape``) and the CUDA build
command, checked on CPU: the choice is pure Python, and PerShape runs real backends here (the
Triton interpreter and the reference) behind a recorder of which one each call went to."""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from fastpatch.kernels import backends
from fastpatch.kernels.backends import NormSpec, cuda
from fastpatch.kernels.triton_ops import dispatch

from casegen import assert_matches_reference, make_case

BOTH = ("cuda", "triton")


@pytest.mark.parametrize("N,rank,index_given,P,expected", [
    (1, 0, False, 1, "cuda"),          # decode, steer
    (1, 16, False, 1, "cuda"),         # decode, low rank: row kernel
    (63, 16, False, 1, "cuda"),        # below the tile kernel's row count
    (64, 16, False, 1, "triton"),      # prefill low rank, one patch: tl.dot tile kernel
    (4096, 8, True, 1, "triton"),      # one-patch bank with an on/off index: still one patch per row
    (4096, 128, False, 1, "triton"),   # R_PAD = 128, the widest tile config
    (4096, 129, False, 1, "cuda"),     # above the tile kernel's rank range
    (4096, 7, False, 1, "cuda"),       # rank below 8: the per-rank loop is cheaper than a 16-wide dot
    (4096, 0, False, 1, "cuda"),       # steering only: no dots at all
    (4096, 16, True, 8, "triton"),     # 8 low-rank patches, per-row index: tile kernel grouped by patch
    (8, 16, True, 8, "cuda"),          # the same bank at decode
])
def test_choose_cuda_by_shape(N, rank, index_given, P, expected):
    assert backends.choose_cuda(N, rank, index_given, P, BOTH) == expected
    assert (expected == "triton") == dispatch.uses_tile_kernel(N, rank, index_given, P)
    # fp32 banks: grouped tiles above R_PAD 64 spill, so those calls stay on the CUDA kernel
    assert backends.choose_cuda(N, rank, index_given, P, BOTH, dot_fp32=True) == (
        "cuda" if (index_given and P > 1 and rank > 64) else expected)


def test_choose_cuda_with_one_backend():
    assert backends.choose_cuda(4096, 16, False, 1, ("cuda",)) == "cuda"      # no triton
    assert backends.choose_cuda(1, 0, False, 1, ("triton",)) == "triton"      # no nvcc
    assert backends.choose_cuda(1, 0, False, 1, ()) == "reference"


class Recorder:
    """A real backend module plus the list of calls it got."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def launch(self, x2d, *args):
        self.calls.append(x2d.shape[0])
        return self.module.launch(x2d, *args)


@pytest.fixture
def per_shape():
    if not backends.load("triton").is_available("cpu"):
        pytest.skip("triton interpreter not available")
    chooser = backends.PerShape(())
    chooser.names = BOTH
    # "cuda" is played by the float64 reference: the CUDA backend cannot run on this machine.
    chooser.modules = {"cuda": Recorder(backends.load("reference")), "triton": Recorder(backends.load("triton"))}
    return chooser


@pytest.mark.parametrize("N,kind,rank,index_mode,P,route", [
    (2, "steer", 4, "none", 1, "cuda"),
    (66, "lowrank", 16, "none", 1, "triton"),
    (66, "lowrank", 16, "mixed", 3, "triton"),
    (66, "steer", 4, "mixed", 3, "cuda"),
])
def test_per_shape_routes_and_computes(per_shape, N, kind, rank, index_mode, P, route):
    case = make_case(N, 32, torch.float32, kind=kind, rank=rank, index_mode=index_mode, num_patches=P)
    out, res = per_shape.run(case.x, case.residual, case.weight, None, NormSpec(0, case.eps), case.bank.kernel_args(),
                             case.index, None)
    assert_matches_reference(case, out, res)
    assert per_shape.modules[route].calls == [N]
    other = "cuda" if route == "triton" else "triton"
    assert per_shape.modules[other].calls == []


def test_no_backend_on_cpu_is_not_per_shape():
    assert not isinstance(backends.resolve(None, torch.device("cpu")), backends.PerShape)


@pytest.mark.gpu
def test_no_backend_on_cuda_is_per_shape():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    assert fp.kernels.backends.prepare("cuda") == "auto"
    impl = backends.resolve(None, torch.device("cuda"))
    assert isinstance(impl, backends.PerShape) and "triton" in impl.names


# --- the CUDA build: explicit, cached, visible ---------------------------------------------------

def test_build_directory_is_torch_extension_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cuda.build_directory() == tmp_path / "fastpatch_cuda"
    assert not cuda.is_cached()
    (tmp_path / "fastpatch_cuda").mkdir()
    (tmp_path / "fastpatch_cuda" / "fastpatch_cuda.so").write_bytes(b"")
    assert cuda.is_cached()  # newer than every source


def test_build_command_reports_why_not(capsys):
    from fastpatch.app import cli

    if not cuda.environment_problem("cuda"):
        pytest.skip("this machine can build the CUDA backend")
    assert cli.main(["build", "--cuda"]) == 1
    text = capsys.readouterr().out
    assert text.startswith("cuda: not built: ") and cuda.environment_problem("cuda") in text


def test_build_command_builds_the_cpp_backend(capsys):
    from fastpatch.app import cli

    assert cli.main(["build", "--cpp"]) == 0
    assert capsys.readouterr().out.startswith("cpp: built: ready in ")
    assert backends.load("cpp").is_available("cpu")
