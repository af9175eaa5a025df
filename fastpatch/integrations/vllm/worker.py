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
from .checkpoint import model_fingerprint
from .model import decoder, install
from .slots import SlotTable, file_digest, read_patches

logger = logging.getLogger("fastpatch.vllm")


class WorkerState:
    """One model runner's patches: the slot table, the index buffer and the request -> slot cache."""

    def __init__(self, runner, conf: cfg.PluginConfig):
        model = runner.get_model()
        layers, _, _ = decoder(model)
        hf = runner.model_config.hf_config
        self.num_layers = len(layers)
        self.hidden_size = int(getattr(hf, "hidden_size"))
        self.fingerprint = model_fingerprint(runner.model_config)
        self.conf = conf
        declared = {name: read_patches(path, self.fingerprint, self.num_layers, conf.force)
                    for name, path in conf.patches.items()}
        param = next(model.parameters())
        self.table = SlotTable(declared, hidden_size=self.hidden_size, num_layers=self.num_layers,
                               capacity=conf.capacity, max_rank=conf.max_rank, sites=conf.sites,
                               dtype=param.dtype, device=param.device)
        n = int(runner.max_num_tokens)
        self.index = torch.full((n,), -1, dtype=torch.int32, device=param.device)
        self.host = self.index if param.device.type == "cpu" else torch.full((n,), -1, dtype=torch.int32)
        self.host_np = self.host.numpy()
        self.filled = 0  # entries past this are -1 already
        self.sites = install(model, self.table.banks, self.index, mode=conf.norm, backend=conf.backend)
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
            if name is None:
                slot = -1
            else:
                slot = self.table.names.get(name)
                if slot is None:  # the front end checks names; this is an unload racing a request
                    logger.error("fastpatch: request %s names patch %r, which is no longer loaded", req_id, name)
                    slot = -1
            self.req_slots[req_id] = slot
        return slot

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
