"""The slot table: named patches in fixed-capacity banks, one bank per patched site.

Every site bank has ``capacity`` rows (one per slot; the declared patches first, then spare slots)
and rank ``max_rank``. A slot whose patch does not touch a site holds the identity there (all zeros,
no gate), so one per-token slot index serves every site. The bank tensors are created once, before
vLLM traces the model; loading, replacing and unloading a patch later are in-place writes into them,
which the traced graph sees.

Fire counts: one int32 tensor ``fires`` [sites, capacity], also created before tracing; each site's patched
norm passes its row to the kernel, which adds, per slot, the token rows where that slot's patch applied
(its gate fired, or it has none). :meth:`SlotTable.fire_counts` folds them into int64 totals on the host
(a copy and an in-place subtract, stream-ordered; no reset races a step). Totals are per name and
cumulative: a name unloaded (or replaced) keeps what it counted, a slot taken by another patch starts at 0.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from ...core.bank import PatchBank
from ...core.patches import CanonicalPatch, Patch, to_canonical
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
        out[key] = to_canonical(value)
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
                 max_rank: Optional[int], sites, dtype: torch.dtype, device, sae_rows: int = 0,
                 sae_keys=(), sae_rank: int = 0):
        """``sae_rows``: rows after the named slots for per-request SAE configs (``capacity`` counts them),
        at the sites ``sae_keys``, of rank up to ``sae_rank``; their banks carry activation levels."""
        self.hidden_size, self.num_layers, self.capacity = hidden_size, num_layers, capacity
        self.named_capacity = capacity - sae_rows
        self.sae_rows = sae_rows
        for name, patches in declared.items():
            for key, c in patches.items():
                if c.hidden_size != hidden_size:
                    raise PatchSlotError(f"fastpatch patch {name!r}: hidden size {c.hidden_size} at {site_name(key)}, "
                                         f"the model's is {hidden_size}")
        used = {k for p in declared.values() for k in p} | set(sae_keys)
        if sites == "all":
            keys = {parse_site(s, num_layers) for s in _all_site_names(num_layers)}
        elif sites is None:
            keys = used
        else:
            keys = {parse_site(s, num_layers) for s in sites}
            keys |= set(sae_keys)
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
        rank = max(rank, sae_rank)
        self.max_rank = rank
        spare = self.named_capacity > len(declared)
        activated = sae_rows > 0 or any(not c.is_identity for p in declared.values() for c in p.values())
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
            if sae_rows:  # an SAE clamp or steer brings a shift
                bank.has_shift = True
            if activated:  # rows with ReLU / JumpReLU components: the levels are a kernel argument
                _enable_activations(bank)
            self.banks[key] = bank
        for slot, name in enumerate(declared):
            self.names[name] = slot
        # fire counts (module docstring): device rows per site, host totals, totals of names no longer loaded
        self.fire_keys = sorted(self.banks)
        self._fire_row = {key: i for i, key in enumerate(self.fire_keys)}
        self.fires = torch.zeros(len(self.fire_keys), capacity, dtype=torch.int32, device=device)
        self._fire_host = torch.zeros(len(self.fire_keys), capacity, dtype=torch.int64)
        self.retired_fires: dict = {}  # name -> {site name: count} counted before an unload / replace
        self.slot_sites: dict = {slot: set(declared[name]) for slot, name in enumerate(declared)}

    # -- fire counts ------------------------------------------------------------------------------
    def fire_buffers(self) -> dict:
        """{site key: the int32 [capacity] row the site's kernel call counts into} (views of ``fires``)."""
        return {key: self.fires[i] for key, i in self._fire_row.items()}

    def harvest_fires(self) -> None:
        """Move the device counts into the host totals: a copy, then the same amount subtracted in place
        (after the copy in stream order), so increments of later steps are never lost."""
        snap = self.fires.clone()
        self._fire_host += snap.to("cpu", torch.int64)
        self.fires.sub_(snap)

    def reset_fires(self) -> None:
        """Zero every count (the start-up self-test runs a patched norm)."""
        self.fires.zero_()
        self._fire_host.zero_()
        self.retired_fires.clear()

    def _reset_slot(self, slot: int, fold: Optional[str] = None) -> None:
        """Zero ``slot``'s counts; ``fold``: the name whose totals keep what the slot counted so far."""
        if fold is not None:
            self.harvest_fires()
            kept = self.retired_fires.setdefault(fold, {})
            for key in self.slot_sites.get(slot, ()):
                site = site_name(key)
                kept[site] = kept.get(site, 0) + int(self._fire_host[self._fire_row[key], slot])
        self.fires[:, slot].zero_()  # stream-ordered: no host sync when nothing is folded
        self._fire_host[:, slot] = 0

    def fire_counts(self, labels: dict) -> dict:
        """{label: {site name: count}}: cumulative token rows that each patch applied to, at the sites it
        touches. ``labels``: {slot: label} of the resident rows (named slots are added here); names no longer
        loaded are included with their final totals."""
        self.harvest_fires()
        labels = {**labels, **{slot: name for name, slot in self.names.items()}}
        out = {name: dict(sites) for name, sites in self.retired_fires.items()}
        for slot, label in labels.items():
            row = out.setdefault(label, {})
            for key in sorted(self.slot_sites.get(slot, ())):
                site = site_name(key)
                row[site] = row.get(site, 0) + int(self._fire_host[self._fire_row[key], slot])
        return out

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
            if not c.is_identity and bank.act_threshold is None:
                raise PatchSlotError(f"fastpatch patch {name!r} has activated components ({c.activation!r}, e.g. an "
                                     "SAE feature edit), but this engine's banks were started without activations: "
                                     "declare the patch at start, or declare an SAE ('saes'), so the banks carry them")
        slot = self.names.get(name)
        if slot is None:
            free = sorted(set(range(self.named_capacity)) - set(self.names.values()))
            if not free:
                raise PatchSlotError(
                    f"fastpatch: all {self.named_capacity} slots are full ({sorted(self.names)}); unload one "
                    "or start the engine with more spare_slots")
            slot = free[0]
            self._reset_slot(slot)  # a free slot counts from 0 (the self-test or an SAE may have used it)
        else:  # a replaced patch: what the old version counted stays in the name's totals
            self._reset_slot(slot, fold=name)
        for key, bank in self.banks.items():
            _write_row(bank, slot, patches.get(key, _zero(self.hidden_size, 0)))
        self.names[name] = slot
        self.slot_sites[slot] = set(patches)
        return slot

    def sae_slot(self, row: int) -> int:
        """The bank slot of SAE row ``row``."""
        if not 0 <= row < self.sae_rows:
            raise PatchSlotError(f"fastpatch: SAE row {row} is outside this engine's {self.sae_rows} sae_slots")
        return self.named_capacity + row

    def write_sae(self, row: int, patches: dict) -> int:
        """Put one SAE config's patches into SAE row ``row`` (identity at every other site), in place."""
        slot = self.sae_slot(row)
        for key, c in patches.items():
            if key not in self.banks:
                raise PatchSlotError(f"fastpatch: SAE site {site_name(key)} has no bank in this engine")
            if c.rank > self.max_rank:
                raise PatchSlotError(f"fastpatch: an SAE config of rank {c.rank} exceeds the banks' rank "
                                     f"{self.max_rank}")
        self._reset_slot(slot)  # another config's row: its counts do not carry over
        for key, bank in self.banks.items():
            _write_row(bank, slot, patches.get(key, _zero(self.hidden_size, 0)))
        self.slot_sites[slot] = set(patches)
        return slot

    def remove(self, name: str) -> int:
        slot = self.slot(name)
        self._reset_slot(slot, fold=name)
        for bank in self.banks.values():
            _write_row(bank, slot, _zero(self.hidden_size, 0))
        self.slot_sites.pop(slot, None)
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
    bank.act_mode = bank.act_mode[:n].contiguous()
    bank.act_jump = bank.act_jump[:n].contiguous()
    bank._act_level = bank._act_level[:n].contiguous()
    if bank.act_threshold is not None:
        bank.act_threshold = bank.act_threshold[:n].contiguous()
    return bank


def _enable_activations(bank: PatchBank) -> None:
    """Give an all-identity bank its activation level tensor (−inf everywhere: every component linear), so
    rows written later may carry ReLU / JumpReLU components; the kernels then always get the levels."""
    if bank.act_threshold is None:
        bank.act_threshold = bank._act_level.to(device=bank.device, dtype=torch.float32).contiguous()
    bank.has_activation = True


def _write_row(bank: PatchBank, slot: int, c: CanonicalPatch) -> None:
    """Overwrite one row of ``bank``'s tensors in place with ``c`` (rank zero-padded): the kernels' tensors,
    the float64 copies the reference backend reads and the activation levels."""
    if c.rank > bank.down.shape[1]:
        raise PatchSlotError(f"fastpatch: a patch of rank {c.rank} does not fit a bank of rank {bank.down.shape[1]}")
    if not c.is_identity and bank.act_threshold is None:
        raise PatchSlotError("fastpatch: a patch with activations does not fit a bank built without them")
    one = PatchBank([c, _zero(bank.hidden_size, bank.down.shape[1])], bank.hidden_size)  # float64 row, padded
    f = one._f64
    with torch.no_grad():
        for name in ("down", "up", "bias", "shift", "gate_dir"):
            getattr(bank, name)[slot].copy_(f[name][0].to(bank.device, bank.dtype))
            bank._f64[name][slot].copy_(f[name][0])
        bank.gate_threshold[slot] = float(f["gate_threshold"][0])
        bank._f64["gate_threshold"][slot] = f["gate_threshold"][0]
        bank.gate_mode[slot] = int(one.gate_mode[0])
        bank.act_mode[slot].copy_(one.act_mode[0])
        bank.act_jump[slot].copy_(one.act_jump[0])
        bank._act_level[slot].copy_(one._act_level[0])
        if bank.act_threshold is not None:
            bank.act_threshold[slot].copy_(one._act_level[0].to(bank.device, torch.float32))
    bank.canonical_patches[slot] = c
