"""CUDA backend checks that need no GPU: nvcc compile of every kernel for sm_80 and sm_90a (no
spills), the host-side launch plan and patch maths under g++, a syntax check of the torch binding
against this torch's headers, and the kernel source itself run on CPU under a fiber emulator of
CUDA threads (csrc/cuda/emulation.h) against the float64 reference."""
from __future__ import annotations

import ctypes
import itertools
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fastpatch as fp
from fastpatch.kernels.ops import check_inputs

from casegen import DTYPES, assert_matches_reference, make_case, poisoned_like

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


def _cuda_include_dirs() -> list[str]:
    """The CUDA toolkit's include folders, as nvcc itself reports them (nvcc may be a wrapper)."""
    if not NVCC:
        return []
    out = subprocess.run([NVCC, "-v", "-x", "cu", "-E", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    dirs = []
    for line in out.splitlines():
        if line.startswith("#$ INCLUDES=") or line.startswith("#$ SYSTEM_INCLUDES="):
            parts = line.split("=", 1)[1].replace('"', " ").split()
            dirs += [p[2:] if p.startswith("-I") else p for p in parts if p not in ("-isystem",)]
    return [d for d in dirs if Path(d).is_dir()]


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: cannot compile the CUDA kernels here")
def test_kernels_compile_without_spills():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cuda_compile_check.py")],
                          capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    # 3 activation dtypes x 2 vector widths x 3 layouts x patched/unpatched, for 2 architectures.
    rows = [line for line in proc.stdout.splitlines() if "fused_add_norm_kernel<" in line]
    assert len(rows) == 72, report
    assert "OK: no compile errors, no spills" in proc.stdout


@pytest.mark.skipif(GXX is None, reason="g++ not on PATH")
def test_launch_plan_and_patch_math_on_host(tmp_path):
    exe = tmp_path / "host_plan_test"
    build = subprocess.run([GXX, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}",
                            str(CSRC / "cuda" / "host_plan_test.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failures" in run.stdout


@pytest.mark.skipif(GXX is None or NVCC is None, reason="needs g++ and the CUDA headers (nvcc)")
def test_binding_parses_against_torch_headers():
    """binding.cpp cannot be linked without a CUDA torch, but it can be type-checked: the CPU wheel
    ships the c10/cuda headers (minus the generated cmake macros)."""
    from torch.utils.cpp_extension import include_paths

    cuda_inc = _cuda_include_dirs()
    if not cuda_inc:
        pytest.skip("could not locate the CUDA include folder from nvcc -v")
    cmd = [GXX, "-fsyntax-only", "-std=c++17", "-w", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-DTORCH_EXTENSION_NAME=fastpatch_cuda", f"-I{CSRC}",
           f"-I{sysconfig.get_paths()['include']}", *[f"-I{p}" for p in include_paths()],
           *[f"-I{p}" for p in cuda_inc], str(CSRC / "cuda" / "binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]


# --- the kernels on CPU, under emulation -----------------------------------------------------------

class Params(ctypes.Structure):
    """Mirror of fastpatch::cuda::FusedAddNormParams (csrc/cuda/params.h); size checked on load."""
    _fields_ = [("rows", ctypes.c_int64), ("hidden", ctypes.c_int), ("x_dtype", ctypes.c_int),
                ("x", ctypes.c_void_p), ("residual", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("residual_out", ctypes.c_void_p), ("norm_kind", ctypes.c_int), ("eps", ctypes.c_float),
                ("weight_offset", ctypes.c_float), ("weight", ctypes.c_void_p), ("weight_dtype", ctypes.c_int),
                ("norm_bias", ctypes.c_void_p), ("norm_bias_dtype", ctypes.c_int),
                ("num_patches", ctypes.c_int), ("rank", ctypes.c_int), ("bank_dtype", ctypes.c_int),
                ("down", ctypes.c_void_p), ("down_bias", ctypes.c_void_p), ("up", ctypes.c_void_p),
                ("shift", ctypes.c_void_p), ("gate_dir", ctypes.c_void_p), ("gate_threshold", ctypes.c_void_p),
                ("gate_mode", ctypes.c_void_p), ("act_threshold", ctypes.c_void_p), ("index", ctypes.c_void_p),
                ("index_is_64", ctypes.c_bool),
                ("fire_counts", ctypes.c_void_p)]


_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
LAYOUTS = ("warp_per_row", "block_per_row", "block_streaming")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cuda_inc = _cuda_include_dirs()
    if GXX is None or not cuda_inc:
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h) found through nvcc")
    lib_path = tmp_path_factory.mktemp("emu") / "libfastpatch_cuda_emu.so"
    cmd = [GXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", f"-I{CSRC}",
           *[f"-I{p}" for p in cuda_inc], str(CSRC / "cuda" / "emulator.cpp"), "-o", str(lib_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    lib = ctypes.CDLL(str(lib_path))
    lib.fastpatch_emu_params_size.restype = ctypes.c_ulong
    assert lib.fastpatch_emu_params_size() == ctypes.sizeof(Params), "Params mirror out of date"
    lib.fastpatch_emu_run.argtypes = [ctypes.POINTER(Params), ctypes.POINTER(ctypes.c_int)]
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


def emulate(lib, x, residual, weight, *, bias=None, eps=1e-6, norm="rms", bank=None, index=None,
            weight_offset=0.0, fire_counts=None, out=None, residual_out=None):
    """fastpatch.fused_add_norm through the CUDA kernel source on CPU tensors.

    Fills the params as binding.cpp + backends/cuda.py do (parts no patch uses are null; float
    parameters not in fp32 or x's dtype are converted to fp32). Returns (out, residual_out, layout).
    """
    x2d, res2d, w, b, norm_kind, idx = check_inputs(x, residual, weight, bias, eps, norm, bank, index,
                                                     weight_offset, fire_counts)
    out2d = torch.empty_like(x2d) if out is None else out.view(x2d.shape)
    res_out2d = torch.empty_like(x2d) if residual_out is None else residual_out.view(x2d.shape)

    def supported(t):
        return t if t is None or t.dtype in (torch.float32, x.dtype) else t.float()

    w, b = supported(w), supported(b)
    p = Params(rows=x2d.shape[0], hidden=x2d.shape[1], x_dtype=_DTYPE_CODE[x.dtype], x=_ptr(x2d),
               residual=_ptr(res2d), out=_ptr(out2d), residual_out=_ptr(res_out2d), norm_kind=norm_kind,
               eps=eps, weight_offset=weight_offset, weight=_ptr(w),
               weight_dtype=_DTYPE_CODE[w.dtype] if w is not None else 0, norm_bias=_ptr(b),
               norm_bias_dtype=_DTYPE_CODE[b.dtype] if b is not None else 0)
    keep = [w, b]
    if bank is not None:
        convert = bank.dtype not in (torch.float32, x.dtype)
        f = (lambda t: t.float()) if convert else (lambda t: t)
        down, dbias, up, shift, gdir = (f(t) for t in (bank.down, bank.bias, bank.up, bank.shift, bank.gate_dir))
        keep += [down, dbias, up, shift, gdir]
        low = bank.rank > 0
        p.num_patches, p.rank = bank.num_patches, bank.rank
        p.bank_dtype = 0 if convert else _DTYPE_CODE[bank.dtype]
        p.down, p.down_bias, p.up = (_ptr(down), _ptr(dbias), _ptr(up)) if low else (None, None, None)
        p.shift = _ptr(shift) if bank.has_shift else None
        p.gate_dir = _ptr(gdir) if bank.has_gate else None
        p.gate_threshold = _ptr(bank.gate_threshold) if bank.has_gate else None
        p.gate_mode = _ptr(bank.gate_mode)
        p.act_threshold = _ptr(bank.act_threshold) if (low and bank.has_activation) else None
        p.index, p.index_is_64 = _ptr(idx), idx is not None and idx.dtype == torch.int64
        p.fire_counts = _ptr(fire_counts)
    plan = (ctypes.c_int * 5)()
    layout = lib.fastpatch_emu_run(ctypes.byref(p), plan)
    assert layout >= 0, f"launch plan refused: {list(plan)}"
    return out2d.view(x.shape), res_out2d.view(x.shape), LAYOUTS[layout]


def emulate_case(lib, case, fire_counts=None):
    return emulate(lib, case.x, case.residual, case.weight, out=poisoned_like(case.x),
                   residual_out=poisoned_like(case.x), fire_counts=fire_counts, **case.kwargs())


def _case(N, D, dtype, kind, gated, index_mode, norm="rms", residual=True, **kw):
    if gated and D == 1:
        kw.setdefault("metric", "projection")  # at D = 1 every cosine is ±1 (see casegen.check)
    return make_case(N, D, dtype, kind=kind, gated=gated, index_mode=index_mode, norm=norm, residual=residual,
                     num_patches=6 if kind == "mix" else 4 if kind == "actmix" else 3, seed=N * 131 + D, **kw)


EMU_KINDS = ("steer", "ablate", "clamp", "lowrank", "loreft", "mix", "relu", "jumprelu", "actmix")


def _grid(reduced: bool):
    """Rows of 64 (warp layout, vector path): every gate/index/norm/residual combination. D = 1
    (scalar warp path) and wide rows (block layout, 192-512 emulated threads, slow to emulate):
    a rotating few unless not `reduced` (the slow test runs them all)."""
    combos = list(itertools.product((False, True), ("none", "all_off", "mixed"), ("rms", "layer"), (True, False)))
    for c in combos:
        yield (9, 64, *c)
    for j, (N, D) in enumerate(((3, 1), (5, 768), (2, 4097))):
        for i, c in enumerate(combos):
            if not reduced or (i + 7 * j) % (4 if D == 1 else 12) == 0:
                yield (N, D, *c)


def _check_grid(lib, dtype, kind, reduced: bool):
    seen = set()
    for N, D, gated, index_mode, norm, residual in _grid(reduced):
        case = _case(N, D, dtype, kind, gated, index_mode, norm, residual)
        out, res_out, layout = emulate_case(lib, case)
        seen.add(layout)
        assert_matches_reference(case, out, res_out)
    assert {"warp_per_row", "block_per_row"} <= seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", EMU_KINDS)
def test_emulated_kernel_matches_reference(emulator, dtype, kind):
    """Narrow and wide rows (warp and block layouts, vector and scalar paths) on every kind/gate/index."""
    _check_grid(emulator, dtype, kind, reduced=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", EMU_KINDS)
def test_emulated_kernel_full_grid(emulator, dtype, kind):
    _check_grid(emulator, dtype, kind, reduced=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_no_bank_and_streaming_rows(emulator, dtype):
    for N, D, norm in ((4, 64, "rms"), (3, 1000, "layer"), (2, 8193, "rms"), (2, 16400, "layer")):
        case = make_case(N, D, dtype, kind=None, norm=norm, seed=D)
        out, res_out, _ = emulate_case(emulator, case)
        assert_matches_reference(case, out, res_out)
    # Rows too wide for the register cache: re-read from global memory between passes.
    case = _case(2, 16400, dtype, "mix", True, "mixed", "layer")
    out, res_out, layout = emulate_case(emulator, case)
    assert layout == "block_streaming"
    assert_matches_reference(case, out, res_out)


def test_emulated_fire_counts_large_rank_and_bank_dtypes(emulator):
    # Fire counts over warp and block layouts.
    for N, D in ((64, 64), (7, 2048)):
        case = _case(N, D, torch.float32, "mix", True, "mixed")
        fc, fc_ref = torch.zeros(6, dtype=torch.int32), torch.zeros(6, dtype=torch.int32)
        out, res_out, _ = emulate_case(emulator, case, fire_counts=fc)
        case.expected(fire_counts=fc_ref)
        assert torch.equal(fc, fc_ref) and int(fc.sum()) > 0
        assert_matches_reference(case, out, res_out)
    # Rank 20: several chunks of dots, z in shared memory for 8 warp rows.
    for D in (64, 1536):
        case = _case(16, D, torch.float32, "lowrank", True, "mixed", rank=20)
        out, res_out, _ = emulate_case(emulator, case)
        assert_matches_reference(case, out, res_out)
    # Bank in fp32, in x's dtype, and in a third dtype (converted to fp32 by the binding).
    for bank_dtype in (torch.float32, torch.bfloat16, torch.float16):
        case = _case(8, 256, torch.bfloat16, "loreft", True, "mixed", bank_dtype=bank_dtype)
        out, res_out, _ = emulate_case(emulator, case)
        assert_matches_reference(case, out, res_out)


def test_emulated_aliasing_misalignment_and_bad_index(emulator):
    # out/residual_out aliasing x/residual, both layouts.
    for D in (64, 4096):
        case = _case(5, D, torch.bfloat16, "mix", True, "mixed", "layer")
        exp = case.expected()
        x, res = case.x.clone(), case.residual.clone()
        out, res_out, _ = emulate(emulator, x, res, case.weight, out=x, residual_out=res, **case.kwargs())
        assert out.data_ptr() == x.data_ptr() and res_out.data_ptr() == res.data_ptr()
        torch.testing.assert_close(res.double(), exp[1], rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(x.double(), exp[0], rtol=2e-2, atol=3e-2)
    # A view one element into its storage: 16-byte accesses are impossible, scalar path instead.
    case = _case(6, 512, torch.float16, "loreft", True, "mixed")
    buf = torch.empty(case.x.numel() + 1, dtype=case.x.dtype)
    buf[1:] = case.x.reshape(-1)
    case.x = buf[1:].view(case.x.shape)
    out, res_out, _ = emulate_case(emulator, case)
    assert_matches_reference(case, out, res_out)
    # Out-of-range ids are "no patch" (the Python check is off, as in a serving loop).
    case = _case(8, 64, torch.float32, "steer", False, "mixed")
    case.index = torch.tensor([0, -1, 3, 99, -7, 2, 1, 2**40], dtype=torch.int64)
    fp.config.check_index_values = False
    try:
        fc = torch.zeros(3, dtype=torch.int32)
        out, res_out, _ = emulate_case(emulator, case, fire_counts=fc)
    finally:
        fp.config.check_index_values = True
    assert fc.tolist() == [1, 1, 1]  # ids 0, 2, 1 are valid; 3, 99, -7, 2**40 are not
    assert_matches_reference(case, out, res_out)  # the reference treats them as "no patch" too


def test_emulated_weight_variants(emulator):
    case = _case(4, 256, torch.bfloat16, "steer", False, "none")
    for weight, offset in ((None, 0.0), (None, 0.5), (case.weight.float(), 1.0), (case.weight, -0.25)):
        kw = case.kwargs()
        out, res_out, _ = emulate(emulator, case.x, case.residual, weight, weight_offset=offset, **kw)
        exp_out, exp_res = fp.reference.fused_add_norm(case.x, case.residual, weight, exact=True,
                                                       weight_offset=offset, **kw)
        torch.testing.assert_close(res_out.double(), exp_res, rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(out.double(), exp_out, rtol=2e-2, atol=3e-2)


def test_backend_reports_unavailable_without_cuda_torch():
    from fastpatch.kernels.backends import cuda

    assert not cuda.is_available("cpu")
    assert "CUDA tensors only" in cuda.why_unavailable("cpu")
    if not (torch.version.cuda and torch.cuda.is_available()):
        assert not cuda.is_available("cuda")
        assert cuda.why_unavailable("cuda") != "available"
        x = torch.randn(2, 8)
        with pytest.raises(ValueError, match="cuda"):
            fp.fused_add_norm(x, None, None, backend="cuda")
