"""The slot table: named patches in fixed-capacity banks, one bank per patched site.

Every site bank has ``capacity`` rows (one per slot; the declared patches first, then spare slots)
and rank ``max_rank``. A slot whose patch does not touch a site holds the identity there (all zeros,
no gate), so one per-token slot index serves every site. The bank tensors are created once, before
vLLM traces the model; loading, replacing and unloading a patch later are in-place writes into them,
which the traced graph sees.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from ...core.bank import PatchBank
from ...core.patches import GATE_NONE, CanonicalPatch, Patch, to_canonical
from ...core.scope import Scoped
from ...core.sites import parse_site, site_name
from ...files.gguf_io import import_gguf
from ...files.patch_file import load as load_patch_file


class PatchSlotError(ValueError):
    """A patch cannot go into this engine's slots (unknown name, full slots, rank or site outside capacity)."""


def file_digest(path) -> str:
    """sha256 of the file's bytes (short): a patch's version in the prefix-cache salt."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_patches(path, fingerprint: Optional[dict], num_layers: int, force: bool = False) -> dict:
    """{site key: CanonicalPatch} of one patch file, refused if it does not fit the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fastpatch: patch file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if is_gguf:
        mapping = import_gguf(path, model=fingerprint)
    else:
        mapping = load_patch_file(path, model=fingerprint, force=force)
    out = {}
    for site, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, Scoped):
            if value.scope.kind != "all":
                raise PatchSlotError(f"{path}: site {site!r} has position scope {str(value.scope)!r}; the vLLM plugin "
                                     "applies patches at every position only")
            value = value.patch
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        if isinstance(value, PatchBank) and value.num_patches == 1:
            value = value.canonical_patches[0]
        if not isinstance(value, (Patch, CanonicalPatch)):
            raise PatchSlotError(f"{path}: site {site!r} holds {type(value).__name__}; a patch for vLLM has one patch "
                                 "per site (combine several with fastpatch.compose)")
        try:
            key = parse_site(site, num_layers)
        except ValueError as exc:
            raise PatchSlotError(f"{path}: {exc}") from None
        if key in out:
            raise PatchSlotError(
                f"{path}: site {site!r} names the same point of the stream as another site in the file")
        canon = to_canonical(value)
        if not canon.is_identity:
            # The slot tables hold no per-component activation yet: serving such a patch as if φ were the
            # identity would be a different edit, so it is refused until the slots carry it.
            raise PatchSlotError(f"{path}: site {site!r} holds a patch with an activation ({canon.activation!r}, e.g. "
                                 "an SAE feature clamp); the vLLM plugin does not serve activated patches yet — "
                                 "apply it in Hugging Face (fastpatch.apply) instead")
        out[key] = canon
    if not out:
        raise PatchSlotError(f"{path}: the file holds no patch")
    return out


def _zero(hidden: int, rank: int) -> CanonicalPatch:
    z = torch.zeros(rank, hidden, dtype=torch.float64)
    return CanonicalPatch(z, torch.zeros(rank, dtype=torch.float64), z.clone(),
                          torch.zeros(hidden, dtype=torch.float64))


class SlotTable:
    """Names -> slots, and the per-site banks the patched norms read.

    ``declared``: {name: {site key: CanonicalPatch}} in slot order; ``capacity`` >= len(declared).
    """

    def __init__(self, declared: dict, *, hidden_size: int, num_layers: int, capacity: int,
                 max_rank: Optional[int], sites, dtype: torch.dtype, device):
        self.hidden_size, self.num_layers, self.capacity = hidden_size, num_layers, capacity
        for name, patches in declared.items():
            for key, c in patches.items():
                if c.hidden_size != hidden_size:
                    raise PatchSlotError(f"fastpatch patch {name!r}: hidden size {c.hidden_size} at {site_name(key)}, "
                                         f"the model's is {hidden_size}")
        used = {k for p in declared.values() for k in p}
        if sites == "all":
            keys = {parse_site(s, num_layers) for s in _all_site_names(num_layers)}
        elif sites is None:
            keys = used
        else:
            keys = {parse_site(s, num_layers) for s in sites}
            missing = used - keys
            if missing:
                raise PatchSlotError(
                    f"fastpatch: declared patches use site(s) {[site_name(k) for k in sorted(missing)]} "
                    "that are not in the 'sites' option")
        if not keys:
            raise PatchSlotError("fastpatch: no site to patch (declare patches or list 'sites' for run-time loads)")
        rank = max([c.rank for p in declared.values() for c in p.values()] + [0])
        if max_rank is not None:
            if rank > max_rank:
                raise PatchSlotError(f"fastpatch: a declared patch has rank {rank} > max_rank {max_rank}")
            rank = max_rank
        self.max_rank = rank
        spare = capacity > len(declared)
        self.names: dict = {}  # name -> slot
        self.digests: dict = {}  # name -> version string (prefix-cache salt)
        self.banks: dict = {}  # site key -> PatchBank with `capacity` rows
        for key in sorted(keys):
            rows = [declared[n].get(key, _zero(hidden_size, 0)) for n in declared]
            rows += [_zero(hidden_size, 0)] * (capacity - len(declared))
            rows.append(_zero(hidden_size, rank))  # pads the bank to max_rank; dropped below
            bank = PatchBank(rows, hidden_size, device=device, dtype=dtype)
            bank = _first_rows(bank, capacity)
            if spare:  # a run-time patch may bring a shift or a gate: keep those arguments in the graph
                bank.has_shift = True
                bank.has_gate = True
            self.banks[key] = bank
        for slot, name in enumerate(declared):
            self.names[name] = slot

    def slot(self, name: str) -> int:
        try:
            return self.names[name]
        except KeyError:
            raise PatchSlotError(f"unknown fastpatch patch {name!r}; this engine has {sorted(self.names)}") from None

    def write(self, name: str, patches: dict) -> int:
        """Put ``patches`` ({site key: CanonicalPatch}) into ``name``'s slot (a free one if new), in place."""
        for key, c in patches.items():
            if key not in self.banks:
                raise PatchSlotError(f"fastpatch patch {name!r} uses site {site_name(key)}, which has no bank in this "
                                     f"engine (sites with banks: {[site_name(k) for k in sorted(self.banks)]}); "
                                     "start the engine with that site in the 'sites' option")
            if c.hidden_size != self.hidden_size:
                raise PatchSlotError(f"fastpatch patch {name!r}: hidden size {c.hidden_size}, the model's is "
                                     f"{self.hidden_size}")
            if c.rank > self.max_rank:
                raise PatchSlotError(f"fastpatch patch {name!r}: rank {c.rank} at {site_name(key)} exceeds this "
                                     f"engine's max_rank {self.max_rank}")
            bank = self.banks[key]
            if c.gate is not None and not bank.has_gate:
                raise PatchSlotError(f"fastpatch patch {name!r} is gated, but the engine was started without gates")
            if bool((c.shift != 0).any()) and not bank.has_shift:
                raise PatchSlotError(f"fastpatch patch {name!r} has a shift, but the engine was started without one")
        slot = self.names.get(name)
        if slot is None:
            free = sorted(set(range(self.capacity)) - set(self.names.values()))
            if not free:
                raise PatchSlotError(
                    f"fastpatch: all {self.capacity} slots are full ({sorted(self.names)}); unload one "
                    "or start the engine with more spare_slots")
            slot = free[0]
        for key, bank in self.banks.items():
            _write_row(bank, slot, patches.get(key, _zero(self.hidden_size, 0)))
        self.names[name] = slot
        return slot

    def remove(self, name: str) -> int:
        slot = self.slot(name)
        for bank in self.banks.values():
            _write_row(bank, slot, _zero(self.hidden_size, 0))
        del self.names[name]
        self.digests.pop(name, None)
        return slot


def _all_site_names(num_layers: int) -> list:
    from ...core.sites import all_sites

    return all_sites(num_layers)


def _first_rows(bank: PatchBank, n: int) -> PatchBank:
    """The bank without its trailing rank-padding row (tensors sliced, then made contiguous)."""
    for name in ("down", "up", "bias", "shift", "gate_dir", "gate_threshold", "gate_mode"):
        setattr(bank, name, getattr(bank, name)[:n].contiguous())
    bank.canonical_patches = bank.canonical_patches[:n]
    bank.patches = bank.patches[:n]
    bank._f64 = {k: v[:n] for k, v in bank._f64.items()}
    return bank


def _write_row(bank: PatchBank, slot: int, c: CanonicalPatch) -> None:
    """Overwrite one row of ``bank``'s tensors in place with ``c`` (rank zero-padded)."""
    r = c.rank
    dt, dev = bank.dtype, bank.device
    with torch.no_grad():
        bank.down[slot].zero_()
        bank.up[slot].zero_()
        bank.bias[slot].zero_()
        if r:
            bank.down[slot, :r].copy_(c.down.to(dev, dt))
            bank.up[slot, :r].copy_(c.up.to(dev, dt))
            bank.bias[slot, :r].copy_(c.bias.to(dev, dt))
        bank.shift[slot].copy_(c.shift.to(dev, dt))
        if c.gate is not None:
            bank.gate_dir[slot].copy_(c.gate.condition.to(dev, dt))
            bank.gate_threshold[slot] = float(c.gate.threshold)
            bank.gate_mode[slot] = int(c.gate.mode)
        else:
            bank.gate_dir[slot].zero_()
            bank.gate_threshold[slot] = 0.0
            bank.gate_mode[slot] = GATE_NONE
    bank.canonical_patches[slot] = c
