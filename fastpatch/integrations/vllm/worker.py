"""The worker side: attach banks after the weights load, fill the per-token slot index every step.

Per step the host repeats each scheduled request's slot by its number of scheduled tokens into one
persistent int32 buffer (−1: no patch), the way vLLM's LoRA builds its per-token adapter ids. The
traced forward only slices that buffer: no host sync, no data-dependent Python inside the graph.
"""
from __future__ import annotations

import logging
import types
from typing import Optional

import numpy as np
import torch

from . import config as cfg
from ...core.sites import site_name
from .checkpoint import model_fingerprint
from .compat import refuse
from . import sae as sae_req
from .model import decoder, install, installed_sites
from .slots import SlotTable, read_patches

logger = logging.getLogger("fastpatch.vllm")
_HARVEST_TOKENS = 1 << 30  # fold the device fire counts into int64 host totals at least this often


class WorkerState:
    """One model runner's patches: the slot table, the index buffer and the request -> slot cache."""

    def __init__(self, runner, conf: cfg.PluginConfig):
        model = runner.get_model()
        dec = decoder(model)
        hf = runner.model_config.hf_config
        self.num_layers = len(dec.layers)
        self.hidden_size = int(getattr(hf, "hidden_size"))
        self.fingerprint = model_fingerprint(runner.model_config)
        self.conf = conf
        declared = {name: read_patches(path, self.fingerprint, self.num_layers, conf.force)
                    for name, path in conf.patches.items()}
        param = next(model.parameters())
        # "all" means the sites this model has: a parallel block (GPT-NeoX) has no resid_mid.
        sites = dec.site_names() if conf.sites == "all" else conf.sites
        for key in {k for patches in declared.values() for k in patches}:
            dec.check_key(key)  # a declared resid_mid on a parallel block: refused, naming the sites it has
        self.saes = {}
        if conf.saes:
            try:
                self.saes = sae_req.load_all(conf)
                sae_req.check_model(self.saes, self.num_layers, self.hidden_size, dec.check_key)
            except ValueError as exc:
                raise refuse(str(exc)) from None
        sae_keys = {k for s in self.saes.values() for k in sae_req.build_keys(s[0], self.num_layers)}
        self.table = SlotTable(declared, hidden_size=self.hidden_size, num_layers=self.num_layers,
                               capacity=conf.capacity, max_rank=conf.max_rank, sites=sites,
                               dtype=param.dtype, device=param.device, sae_rows=conf.sae_slots,
                               sae_keys=sae_keys, sae_rank=conf.max_sae_features if conf.saes else 0)
        self.row_hash: dict = {}  # SAE row -> the config hash it holds
        n = int(runner.max_num_tokens)
        self.index = torch.full((n,), -1, dtype=torch.int32, device=param.device)
        self.host = self.index if param.device.type == "cpu" else torch.full((n,), -1, dtype=torch.int32)
        self.host_np = self.host.numpy()
        self.filled = 0  # entries past this are -1 already
        self.sites = install(model, self.table.banks, self.index, mode=conf.norm, backend=conf.backend,
                             fires=self.table.fire_buffers())
        check_installed(model, self.table.banks)
        self_test(model, self.table.banks, self.index, conf.norm)
        self.table.reset_fires()  # the self-test's rows are not requests
        self.unharvested = 0  # tokens since the int32 fire counts were last folded into the host totals
        self.req_slots: dict = {}
        self.runner = runner
        logger.info("fastpatch: %d patch(es) %s in %d slots at %d site(s), norm=%s", len(declared),
                    sorted(declared), conf.capacity, len(self.sites), conf.norm)

    def slot_of(self, req_id: str) -> int:
        slot = self.req_slots.get(req_id)
        if slot is None:
            state = self.runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None) or {}
            name = extra.get(cfg.KEY)
            sae_conf = extra.get(sae_req.CONFIG_KEY)
            if sae_conf is not None:  # an SAE feature config (the front end checked it, the scheduler gave a row)
                slot = self.sae_slot(req_id, sae_conf, extra.get(sae_req.ROW_KEY))
            elif name is None:
                slot = -1
            else:
                slot = self.table.names.get(name)
                if slot is None:  # the front end checks names; this is an unload racing a request
                    logger.error("fastpatch: request %s names patch %r, which is no longer loaded", req_id, name)
                    slot = -1
            self.req_slots[req_id] = slot
        return slot

    def sae_slot(self, req_id: str, conf: dict, row) -> int:
        """The bank slot of a request's SAE config, its row (re)written first when it holds another config.
        Fails loudly (never unpatched) when the scheduler gave the request no row."""
        h = conf.get(sae_req.HASH) if isinstance(conf, dict) else None
        if not self.saes or not isinstance(h, str) or isinstance(row, bool) or not isinstance(row, int):
            raise RuntimeError(f"fastpatch: request {req_id} carries an SAE config without a checked hash or a "
                               f"scheduler row (row={row!r}); it must not run unpatched")
        if self.row_hash.get(row) != h:
            patches = sae_req.build(conf, self.saes, self.num_layers)
            self.table.write_sae(row, patches)
            self.row_hash[row] = h
            # requests cached on this row held the previous config: they finished (the scheduler frees a row
            # only when its last request ends), so their cache entries go
            self.req_slots = {r: s for r, s in self.req_slots.items() if s != self.table.sae_slot(row)}
        return self.table.sae_slot(row)

    def fill(self, num_scheduled_tokens: np.ndarray) -> None:
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        ids = batch.req_ids[:num_reqs]
        slots = np.fromiter((self.slot_of(r) for r in ids), dtype=np.int32, count=num_reqs)
        per_token = np.repeat(slots, num_scheduled_tokens[:num_reqs])
        n = per_token.shape[0]
        buf = self.host_np
        buf[:n] = per_token
        if self.filled > n:
            buf[n:self.filled] = -1
        self.filled = n
        self.unharvested += n
        if self.unharvested > _HARVEST_TOKENS:  # each count grows by at most one per token: int32 never wraps
            self.table.harvest_fires()
            self.unharvested = 0
        if self.host is not self.index:
            self.index.copy_(self.host, non_blocking=True)
        if len(self.req_slots) > 4 * max(num_reqs, 64):  # forget finished requests
            live = set(ids)
            self.req_slots = {r: s for r, s in self.req_slots.items() if r in live}

    # run-time changes (called through the worker extension)
    def load(self, name: str, path: str) -> int:
        cfg.check_name(name)
        patches = read_patches(path, self.fingerprint, self.num_layers, self.conf.force)
        slot = self.table.write(name, patches)
        self.req_slots.clear()
        return slot

    def unload(self, name: str) -> int:
        slot = self.table.remove(name)
        self.req_slots.clear()
        return slot

    def fire_counts(self) -> dict:
        """{patch name: {site: tokens it applied to}}, cumulative (see SlotTable.fire_counts); resident SAE
        rows as ``sae:<config hash>`` (reset when the row takes another config)."""
        labels = {self.table.sae_slot(row): f"sae:{h}" for row, h in self.row_hash.items()}
        return self.table.fire_counts(labels)


def _where(model, norm, key) -> str:
    names = {id(m): n for n, m in model.named_modules()}
    return f"site {site_name(key)} (module {names.get(id(norm), '?')}, {type(norm).__name__})"


def _what(dec) -> str:
    return "patch hook" if dec.layout.form == "hooks" else "patched norm"


def check_installed(model, banks: dict) -> None:
    """Every site with a bank must run fastpatch's forward on its norm (or its hook), else the engine does
    not start (an install that attached nowhere would serve every patched request unpatched)."""
    dec = decoder(model)
    for key in sorted(banks):
        module = dec.module_for(key)
        if key not in installed_sites(module):
            raise refuse(f"the {_what(dec)} is not installed at {_where(model, module, key)}")


# Start-up self-test tolerances: max |error| <= TOL * (1 + max |reference|). A kernel that drops or
# misapplies the patch is off by the known patch's size (~1), far above these.
_SELF_TEST_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 4e-2}
_ROW_FIELDS = ("down", "up", "bias", "shift", "gate_dir", "gate_threshold", "gate_mode")


@torch.no_grad()  # vLLM's norm weight is a Parameter: no graph for the self-test's arithmetic
def self_test(model, banks: dict, index: torch.Tensor, mode: str) -> float:
    """Run one patched norm on two rows (a known patch in one slot, no patch) and compare with the float64
    reference (fastpatch.core.reference). The slot's bank row and the index entries are restored afterwards
    (in a finally). Returns the max error; raises FastpatchStartError when it is above tolerance."""
    from ...core.bank import PatchBank
    from ...core.patches import CanonicalPatch
    from ...core.reference import fused_add_norm
    from .slots import _write_row

    dec = decoder(model)
    offset = dec.offset
    key = sorted(banks)[0]
    bank = banks[key]
    norm = dec.module_for(key)
    hooks = dec.layout.form == "hooks"
    # The sum is the norm's input (written back in place) at layer 0's resid_pre, in the inplace form
    # (Granite) and in the hooks form: no residual argument there.
    no_residual = key[0] == "pre" or dec.layout.form != "fused"
    d, rank = bank.hidden_size, bank.down.shape[1]
    slot = bank.num_patches - 1  # the last slot: a spare one when the engine has spares
    t = torch.linspace(-1.0, 1.0, d, dtype=torch.float64)
    r = 1 if rank else 0
    down = torch.sin(5 * t)[None, :].expand(r, d) / torch.sin(5 * t).norm()
    # Only the parts this bank's compiled-in arguments carry: a bank built without shifts has its shift
    # argument switched off in the kernel, so a shift there would be a false alarm.
    shift = 1.5 * torch.cos(3 * t) if bank.has_shift else torch.zeros(d, dtype=torch.float64)
    # A bank with activation levels (SAE rows) is tested with a ReLU component: the levels are checked too.
    act = "relu" if (r and bank.act_threshold is not None) else "identity"
    known = CanonicalPatch(down.contiguous(), torch.full((r,), 0.25, dtype=torch.float64),
                           (0.8 * torch.sin(7 * t))[None, :].expand(r, d).contiguous(), shift, activation=act)
    if not r and not bank.has_shift:
        logger.warning("fastpatch: %s has neither a shift nor a low-rank part; the start-up self-test only "
                       "checked that its patched forward is installed", site_name(key))
        return 0.0
    w = torch.ones(d, dtype=bank.dtype, device=bank.down.device) if hooks else norm.weight
    n = 2
    x = (torch.sin(torch.arange(n * d, dtype=torch.float64) * 0.37).view(n, d) * 2).to(w.device, w.dtype)
    res = None if no_residual else torch.cos(torch.arange(n * d, dtype=torch.float64) * 0.11).view(n, d).to(
        w.device, w.dtype)
    eps = 1e-6 if hooks else float(norm.variance_epsilon)
    ref_out, ref_h = fused_add_norm(x, res, w, eps=eps, norm="rms",
                                    bank=PatchBank([known], d), index=torch.tensor([0, -1]),
                                    weight_offset=offset, exact=True)
    fields = _ROW_FIELDS + (("act_threshold",) if bank.act_threshold is not None else ())
    saved_row = {f: getattr(bank, f)[slot].clone() for f in fields}
    saved_canon = bank.canonical_patches[slot]
    saved_index = index[:n].clone()
    try:
        _write_row(bank, slot, known)
        index[:n] = torch.tensor([slot, -1], dtype=index.dtype, device=index.device)
        xin = x.clone()
        if hooks:  # the installed hook itself, as the layer would call it; it patches xin in place
            hook = next(h for h in (*norm._forward_hooks.values(), *norm._forward_pre_hooks.values())
                        if getattr(h, "_fastpatch_site", None) == key)
            hook(norm, (xin,), {}, xin) if key[0] == "post" else hook(norm, (xin,), {})
            out, summed = None, xin
        elif res is None:  # a norm called on the stream alone: the patched stream is written back into x
            out = norm.forward(xin)
            summed = xin
        else:
            out, summed = norm.forward(xin, res.clone())
    finally:
        _write_row(bank, slot, saved_canon)  # the float64 copies and activation rows
        for f, v in saved_row.items():  # the kernels' tensors, bit for bit
            getattr(bank, f)[slot].copy_(v)
        bank.canonical_patches[slot] = saved_canon
        index[:n].copy_(saved_index)
    err = float((summed.double().cpu() - ref_h).abs().max())
    if out is not None:  # a hook has no norm output: only the patched stream
        err = max(err, float((out.double().cpu() - ref_out).abs().max()))
    tol = _SELF_TEST_TOL.get(w.dtype, 4e-2) * (1.0 + float(ref_out.abs().max()) + float(ref_h.abs().max()))
    if not err <= tol:  # also catches NaN
        raise refuse(f"the {_what(dec)} at {_where(model, norm, key)} failed its start-up self-test (norm={mode!r}): "
                     f"max |error| {err:.3g} against fastpatch.core.reference for a known patch in slot {slot}, "
                     f"tolerance {tol:.3g}")
    logger.info("fastpatch: start-up self-test at %s passed (max |error| %.3g)", site_name(key), err)
    return err


def attach(runner) -> Optional[WorkerState]:
    """Attach fastpatch to a loaded model runner if the engine's additional_config asks for it."""
    raw = cfg.section(runner.vllm_config.additional_config)
    if raw is None or getattr(runner, "_fastpatch", None) is not None:
        return None
    conf = cfg.parse(raw)
    state = WorkerState(runner, conf)
    vanilla_prepare = runner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = vanilla_prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state.fill(num_scheduled_tokens)
        return result

    runner._prepare_inputs = types.MethodType(_prepare_inputs, runner)
    runner._fastpatch = state
    return state


def state_of(worker) -> WorkerState:
    state = getattr(getattr(worker, "model_runner", None), "_fastpatch", None)
    if state is None:
        raise RuntimeError("fastpatch is not active in this engine: start it with additional_config={'fastpatch': ...}")
    return state


class WorkerExtension:
    """Mixed into vLLM's worker with ``worker_extension_cls="fastpatch.integrations.vllm.WorkerExtension"``:
    run-time patch changes through ``llm.collective_rpc`` (use :func:`load_patch` / :func:`unload_patch`)."""

    def fastpatch_load(self, name: str, path: str) -> int:
        return state_of(self).load(name, path)

    def fastpatch_unload(self, name: str) -> int:
        return state_of(self).unload(name)

    def fastpatch_slots(self) -> dict:
        return dict(state_of(self).table.names)

    def fastpatch_fire_counts(self) -> dict:
        return state_of(self).fire_counts()
