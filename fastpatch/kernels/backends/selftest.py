"""First-use self-test of the compiled backends against the float64 reference, and the texts that say
why a backend is not used and how to fix it.

Why: the CUDA and Triton kernels are checked on CPU (interpreter, AOT compiles) but a user's GPU may be
the first one they ever run on, and a C++ build can be miscompiled or stale. So the first time a
process uses a compiled backend on a device, :func:`check` runs a few tiny calls through the backend's
``run`` and compares them with :func:`fastpatch.core.reference.fused_add_norm` — every gate mode, a
bank with a per-row index (−1 rows included), a bank mixing identity, ReLU and JumpReLU components,
a one-patch low-rank bank without an index, RMS and
Layer norm, fire counts, and an unpatched call; on CUDA also a 64-row rank-16 call (the Triton tile
kernel). A mismatch or a crash refuses the backend (``backends.resolve`` then warns and takes the
next one, or raises for a named backend).

Cost: milliseconds per dtype on CPU (cpp), the triton interpreter ~1 s per dtype; on a GPU a few
Triton JIT compiles per dtype the first time (triton's disk cache makes later processes fast). It
runs once per (backend, device, dtype) per process; afterwards ``resolve`` is a dict lookup as before.
``FASTPATCH_SELFTEST=0`` turns it off.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...core import reference
from ...core.bank import PatchBank
from .calls import NormSpec
from ...core.patches import Ablate, CanonicalPatch, Clamp, Encoded, Gate, Gated, LowRank, Steer

ENV = "FASTPATCH_SELFTEST"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (rtol, atol) against the float64 reference: the table tests/casegen.py uses. The oracle gets the
# bank exactly as the kernel got it (rounded to the bank's dtype), so only the activations' rounding
# is tolerated: the residual rounded once, the normed output twice.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (3e-3, 4e-3),
}

# Backends compiled once for every dtype (one build, all dtypes in it): their first use tests every
# dtype, because the cpp fast path (a cached plan) can later take a call of another dtype without
# passing through resolve(). Triton compiles per dtype, so it is tested per dtype as it is used.
ALL_DTYPES_AT_ONCE = ("cpp", "cuda")


def enabled() -> bool:
    """False when ``FASTPATCH_SELFTEST=0`` (read at each first use, so tests and users can set it late)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class Result:
    """One backend on one device, one or more dtypes."""

    backend: str
    device: str
    dtypes: tuple
    ok: bool = True
    max_error: float = 0.0      # |got − expected| at the worst element (relative to its tolerance)
    tolerance: float = 0.0      # atol + rtol·|expected| at that element
    worst: str = ""             # "float32 bank out[3, 17]": where the worst element was
    error: str = ""             # an exception or a fire-count mismatch, when there was one
    seconds: float = 0.0
    cases: int = 0

    @property
    def ratio(self) -> float:
        return self.max_error / self.tolerance if self.tolerance else (0.0 if self.ok else math.inf)

    def merge(self, other: "Result") -> "Result":
        """The worse of two results over the union of their dtypes."""
        dtypes = self.dtypes + tuple(d for d in other.dtypes if d not in self.dtypes)
        worse = other if (not other.ok, other.ratio) > (not self.ok, self.ratio) else self
        return Result(self.backend, self.device, dtypes, self.ok and other.ok, worse.max_error, worse.tolerance,
                      worse.worst, self.error or other.error, self.seconds + other.seconds,
                      self.cases + other.cases)

    def describe(self) -> str:
        """One line: what was compared and how far apart it was."""
        names = ", ".join(_dtype_name(d) for d in self.dtypes)
        if self.error:
            return f"{names}: {self.error}"
        return (f"{names}: max error {self.max_error:.3g} vs tolerance {self.tolerance:.3g}"
                + (f" at {self.worst}" if self.worst else "") + f" ({self.cases} cases, {self.seconds * 1e3:.0f} ms)")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- the cases ---------------------------------------------------------------------------------------

@dataclass
class _Case:
    name: str
    x: torch.Tensor
    residual: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    norm_kind: int
    eps: float
    weight_offset: float
    bank: Optional[PatchBank]
    index: Optional[torch.Tensor]
    count_fires: bool = False
    oracle_bank: Optional[PatchBank] = field(default=None)


def _gate_threshold(h: torch.Tensor, condition: torch.Tensor, metric: str) -> float:
    """A threshold in the widest gap between the rows' metric values around their median, so that a
    backend's rounding cannot flip a gate decision (and some rows fire, some do not)."""
    c = condition / condition.norm()
    vals = h @ c
    if metric == "cosine":
        vals = vals / h.norm(dim=-1).clamp_min(1e-300)
    v, _ = torch.sort(vals)
    n = v.numel()
    lo, hi = max(0, n // 4 - 1), min(n - 1, (3 * n) // 4 + 1)
    j = int(torch.argmax(v[lo + 1:hi + 1] - v[lo:hi])) + lo
    return float((v[j] + v[j + 1]) / 2)


def _as_given(bank: PatchBank) -> PatchBank:
    """The oracle's bank: the same patches with the values the kernel reads (rounded to the bank's
    dtype), so bank rounding is not counted as kernel error."""
    t = {k: v.detach().to("cpu", torch.float64) for k, v in bank.tensors().items() if v is not None}
    patches = []
    for k, c in enumerate(bank.canonical_patches):
        gate = None
        if c.gate is not None:
            gate = Gate(t["gate_dir"][k].clone(), float(t["gate_threshold"][k]), c.gate.metric, c.gate.fire)
        patches.append(CanonicalPatch(t["down"][k].clone(), t["bias"][k].clone(), t["up"][k].clone(),
                                      t["shift"][k].clone(), gate=gate, kind=c.kind,
                                      activation=_padded(c.activations, bank.rank),
                                      threshold=None if c.threshold is None else
                                      torch.cat([c.threshold, c.threshold.new_zeros(bank.rank - c.rank)])))
    return PatchBank(patches, bank.hidden_size, dtype=torch.float32)


def _padded(acts: tuple, rank: int) -> tuple:
    """Per-component activations padded to the bank's rank (padding components are identity)."""
    return tuple(acts) + ("identity",) * (rank - len(acts))


def _jump_thresholds(h: torch.Tensor, down: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per component, a JumpReLU θ in the widest gap of z = h·downᵀ + bias over the rows, so that
    rounding cannot move a row across the jump (and some rows pass it, some do not)."""
    z = h @ down.T + bias
    return torch.tensor([_gate_threshold_values(z[:, r]) for r in range(z.shape[1])], dtype=torch.float64)


def _gate_threshold_values(vals: torch.Tensor) -> float:
    v, _ = torch.sort(vals)
    n = v.numel()
    lo, hi = max(0, n // 4 - 1), min(n - 1, (3 * n) // 4 + 1)
    j = int(torch.argmax(v[lo + 1:hi + 1] - v[lo:hi])) + lo
    return float((v[j] + v[j + 1]) / 2)


def _cases(dtype: torch.dtype, device: torch.device, small: bool) -> list[_Case]:
    gen = torch.Generator().manual_seed(1234)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    # D = 72: not a multiple of 16/32, so vector loops have a tail; the widths differ per case.
    D = 40 if small else 72
    cases = []

    # 1. every gate mode in one bank, a per-row index with −1 rows, residual, RMS, fire counts, the
    #    bank in the activations' dtype (what apply() builds).
    N = 12 if small else 16
    x, res = randn(N, D), randn(N, D)
    h = x.to(dtype).double() + res.to(dtype).double()
    gated = []
    for inner, metric, fire in ((LowRank(randn(D, 4) / D**0.5, randn(4, D) / 2, bias=randn(4) * 0.3),
                                 "cosine", "above"),
                                (Ablate(randn(D)), "cosine", "below"),
                                (Clamp(randn(D), value=0.7), "projection", "above"),
                                (Steer(randn(D), scale=0.8), "projection", "below")):
        cond = randn(D)
        gated.append(Gated(inner, cond, _gate_threshold(h, cond, metric), metric=metric, fire=fire))
    bank = PatchBank([Steer(randn(D))] + gated, D, dtype=dtype)  # patch 0 ungated (GATE_NONE)
    index = torch.arange(N, dtype=torch.int32) % (bank.num_patches + 1) - 1  # -1, 0, 1, ..., 4, -1, ...
    cases.append(_Case("bank", x, res, 1 + 0.3 * randn(D), None, 0, 1e-6, 0.0, bank, index, count_fires=True))

    # 1b. per-component activations: identity, ReLU and JumpReLU patches in one bank (θ placed between
    #     the rows' z values so a rounding cannot flip a jump), rows of every patch and −1 rows.
    x, res = randn(N, D), randn(N, D)
    h = x.to(dtype).double() + res.to(dtype).double()
    dj, bj = randn(4, D) / D**0.5, randn(4) * 0.5
    acts = [LowRank(randn(D, 3) / D**0.5, randn(3, D) / 2, bias=randn(3) * 0.3),
            Encoded(randn(5, D) / D**0.5, randn(5) * 0.5, randn(5, D) / 2, activation="relu"),
            Encoded(dj, bj, randn(4, D) / 2, activation="jumprelu", threshold=_jump_thresholds(h, dj, bj))]
    bank = PatchBank(acts, D, dtype=dtype)
    index = torch.arange(N, dtype=torch.int64) % (bank.num_patches + 1) - 1
    cases.append(_Case("activation", x, res, 1 + 0.3 * randn(D), None, 0, 1e-6, 0.0, bank, index, count_fires=True))

    # 2. LayerNorm with bias, a one-patch low-rank bank (float32) applied to every row (index None),
    #    weight_offset (Gemma-style), no fire counts.
    N = 5
    lr = LowRank(randn(D, 8) / D**0.5, randn(8, D) / 3, bias=randn(8) * 0.3)
    cases.append(_Case("layer", randn(N, D) * 2, randn(N, D), 0.3 * randn(D), 0.2 * randn(D), 1, 1e-5, 1.0,
                       PatchBank([lr], D, dtype=torch.float32), None))

    # 3. no bank, no residual, a float32 weight under 16-bit activations: the plain fused norm.
    cases.append(_Case("plain", randn(3, D + 8), None, 1 + 0.3 * randn(D + 8), None, 0, 1e-6, 0.0, None, None))

    # 4. on a GPU: 64 rows of a rank-16 patch, the shape PerShape sends to Triton's tile kernel
    #    (tensor-core dots), int64 index into a one-patch bank with some rows off.
    if device.type == "cuda":
        D4, N4 = 128, 64
        lr = LowRank(randn(D4, 16) / D4**0.5, randn(16, D4) / 4)
        idx = torch.zeros(N4, dtype=torch.int64)
        idx[::7] = -1
        cases.append(_Case("tile", randn(N4, D4), randn(N4, D4), 1 + 0.3 * randn(D4), None, 0, 1e-6, 0.0,
                           PatchBank([lr], D4, dtype=dtype), idx))

    out = []
    for c in cases:
        def cast(t, dt=dtype):
            return None if t is None else t.to(device=device, dtype=dt)

        out.append(_Case(
            c.name, cast(c.x), cast(c.residual),
            None if c.weight is None
            else c.weight.to(device=device, dtype=torch.float32 if c.name == "plain" else dtype),
            cast(c.bias), c.norm_kind, c.eps, c.weight_offset,
            None if c.bank is None else c.bank.to(device), None if c.index is None else c.index.to(device),
            c.count_fires, None if c.bank is None else _as_given(c.bank)))
    return out


def _compare(name: str, got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float):
    """(error, tolerance, where) at the element worst relative to its tolerance; NaN/inf counts as inf."""
    got = got.detach().to("cpu", torch.float64)
    err = (got - expected).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))
    tol = atol + rtol * expected.abs()
    flat = int(torch.argmax(err / tol))
    row, col = divmod(flat, err.shape[-1])  # not torch.unravel_index: it imports sympy (seconds)
    return float(err.reshape(-1)[flat]), float(tol.reshape(-1)[flat]), f"{name}[{row}, {col}]"


def _run_case(run, case: _Case, dtype, result: Result) -> None:
    N, D = case.x.shape
    dev = case.x.device
    # NaN-filled outputs: an element the kernel forgets to write fails the comparison.
    out = torch.full_like(case.x, math.nan)
    res_out = torch.full_like(case.x, math.nan)
    fires = torch.zeros(case.bank.num_patches, dtype=torch.int32, device=dev) if case.count_fires else None
    o, r = run(case.x, case.residual, case.weight, case.bias, NormSpec(case.norm_kind, case.eps, case.weight_offset),
               None if case.bank is None else case.bank.kernel_args(), case.index, fires, out, res_out)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # an asynchronous kernel fault surfaces here, inside the try

    def cpu(t):
        return None if t is None else t.cpu()

    exp_fires = torch.zeros(case.bank.num_patches, dtype=torch.int32) if case.count_fires else None
    exp_o, exp_r = reference.fused_add_norm(
        cpu(case.x), cpu(case.residual), cpu(case.weight), bias=cpu(case.bias), eps=case.eps,
        norm=("rms", "layer")[case.norm_kind], bank=case.oracle_bank, index=cpu(case.index),
        weight_offset=case.weight_offset, fire_counts=exp_fires, exact=True)
    rtol, atol = TOLERANCES[dtype]
    for label, got, exp in (("out", o, exp_o), ("residual_out", r, exp_r)):
        if got.shape != exp.shape or got.dtype != dtype:
            result.ok = False
            result.error = (f"{_dtype_name(dtype)} {case.name}: {label} has shape {tuple(got.shape)} dtype "
                            f"{got.dtype}, expected {tuple(exp.shape)} {dtype}")
            return
        err, tol, where = _compare(label, got, exp, rtol, atol)
        if err / tol > result.ratio or (not math.isfinite(err) and math.isfinite(result.max_error)):
            result.max_error, result.tolerance = err, tol
            result.worst = f"{_dtype_name(dtype)} {case.name} {where}"
        if not err <= tol:
            result.ok = False
    if fires is not None and not torch.equal(fires.cpu(), exp_fires):
        result.ok = False
        result.error = (f"{_dtype_name(dtype)} {case.name}: fire counts {fires.cpu().tolist()}, "
                        f"reference {exp_fires.tolist()}")


def run(backend: str, module, device, dtypes=DTYPES) -> Result:
    """Run the self-test of ``module`` (a backend: ``run(...)`` as in ``backends/__init__``) on
    ``device`` for ``dtypes`` now, uncached. Never raises for a wrong or crashing kernel: the
    result says what went wrong."""
    device = torch.device(device)
    dtypes = tuple(dtypes)
    result = Result(backend, str(device), dtypes)
    # The interpreter runs Triton kernels in numpy, op by op: keep its cases small.
    small = backend == "triton" and device.type == "cpu"
    start = time.perf_counter()
    try:
        for dtype in dtypes:
            for case in _cases(dtype, device, small):
                _run_case(module.run, case, dtype, result)
                result.cases += 1
                if result.error:
                    break
    except Exception as exc:  # a crash is a failed self-test, reported with its message
        result.ok = False
        result.error = f"crashed: {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    result.seconds = time.perf_counter() - start
    return result


# --- once per process --------------------------------------------------------------------------------

_lock = threading.Lock()
_results: dict = {}  # (backend, device, dtype) -> Result of that dtype
calls = 0  # how many self-tests ran in this process (tests count them)


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def dtypes_for(backend: str, dtype) -> tuple:
    if dtype is None or backend in ALL_DTYPES_AT_ONCE:
        return DTYPES
    return (dtype,)


def check(backend: str, module, device, dtype=None) -> Result:
    """The self-test result of ``backend`` on ``device`` for ``dtype`` (None: every dtype), run on
    first use and remembered for the process."""
    global calls
    device = _device_key(torch.device(device))
    wanted = dtypes_for(backend, dtype)
    with _lock:  # two threads' first calls must not both run (or half-see) the test
        missing = tuple(d for d in wanted if (backend, device, d) not in _results)
        merged = None
        if missing:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # the test allocates and syncs, which a capture forbids: it would "crash" and refuse a
                # good backend. Same rule as for torch.compile: resolve before capturing.
                raise RuntimeError(
                    f"fastpatch backend {backend!r} has not passed its first-use self-test on {device} yet and "
                    f"cannot run it during CUDA graph capture: call fastpatch.kernels.backends.prepare("
                    f"{device.type!r}) (or run the op once eagerly) before capturing")
            calls += 1
            merged = run(backend, module, device, missing)
            for d in missing:
                # a failure in any dtype of one build refuses the build: remembered under each dtype tested
                _results[backend, device, d] = merged
        seen = {id(merged)}
        for d in wanted:
            r = _results[backend, device, d]
            if id(r) not in seen:  # one run may be remembered under several dtypes: count it once
                seen.add(id(r))
                merged = r if merged is None else merged.merge(r)
        return merged


def forget() -> None:
    """Drop remembered results (tests; after rebuilding a backend in the same process)."""
    global calls
    with _lock:
        _results.clear()
        calls = 0


# --- what to tell the user ---------------------------------------------------------------------------

def fix_for(backend: str, reason: str) -> str:
    """The fix for a backend that is unavailable for ``reason`` (its ``why_unavailable`` text)."""
    low = reason.lower()
    if "self-test" in low:
        return refused_fix(backend)
    if "ninja" in low:
        return "install ninja (`pip install ninja`), then run `fastpatch build`"
    if backend == "triton":
        if "could not be imported" in low:
            return "install triton (`pip install triton`; it comes with CUDA builds of torch)"
        if "interpret" in low:
            return "on CPU the cpp backend is the fast one; Triton runs here only under TRITON_INTERPRET=1 (tests)"
        return "use a CUDA build of torch on a machine with an NVIDIA GPU"
    if backend == "cuda":
        if "not a cuda build" in low or "no cuda device" in low:
            return "install a CUDA build of torch on a machine with an NVIDIA GPU"
        if "fastpatch_cuda_build=0" in low:
            return "run `fastpatch build --cuda` once (FASTPATCH_CUDA_BUILD=0 forbids building on first use)"
        if "nvcc" in low or "cuda_home" in low:
            return ("install the CUDA toolkit (nvcc) matching torch.version.cuda and set CUDA_HOME, then run "
                    "`fastpatch build --cuda -v`")
        return "run `fastpatch build --cuda -v` to see the compiler's output"
    if any(w in low for w in ("compiler", "c++", "g++", "gcc", "clang", "no such file", "not found", "error:")):
        return ("install a C++ compiler (`apt-get install g++`, Xcode's command line tools on macOS, or set CXX) "
                "and ninja, then run `fastpatch build --cpp -v` to see the compiler's output")
    return "run `fastpatch build -v` to see the compiler's output"


def refused_fix(backend: str) -> str:
    return (f"a stale or miscompiled build is the usual cause: delete the build cache (`fastpatch doctor` shows "
            f"where it is) and run `fastpatch build`; if `fastpatch doctor` still reports the mismatch, report it "
            f"to fastpatch's issue tracker with doctor's output. Name a backend (e.g. backend='reference') "
            f"to choose another, or set {ENV}=0 to skip the check (not recommended)")


def refusal_message(result: Result, named: bool, fallback: Optional[str] = None) -> str:
    what = (f"fastpatch: the {result.backend} backend failed its self-test against the float64 reference on "
            f"{result.device} ({result.describe()})")
    if named:
        return f"{what}; refusing to run backend={result.backend!r}. Fix: {refused_fix(result.backend)}."
    then = f"backend=None uses {fallback!r} instead" if fallback else "backend=None takes the next backend"
    return f"{what}; {then}. Fix: {refused_fix(result.backend)}."
