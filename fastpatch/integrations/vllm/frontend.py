"""The front end (the process that takes requests): check the patch a request names, salt its KV cache.

Runs in vLLM's ``InputProcessor`` before a request reaches the engine, so an unknown patch name is a
``VLLMValidationError`` (HTTP 400 on the server) and never a silently unpatched generation. The request's
``cache_salt`` gets the patch's name and file digest: vLLM's prefix cache hashes the salt into the first
block, so patched and unpatched requests (or two versions of one patch) never share KV blocks.
"""
from __future__ import annotations

import threading
from typing import Optional

from . import config as cfg
from .slots import file_digest


class FrontEnd:
    """The allowlist of patch names (declared + loaded at run time) and their cache salts."""

    def __init__(self, conf: cfg.PluginConfig):
        self.conf = conf
        self.lock = threading.Lock()
        self.salts = {name: _salt(name, file_digest(path)) for name, path in conf.patches.items()}

    def check(self, params) -> Optional[str]:
        """The patch name a request asks for (None: none); VLLMValidationError for a bad one."""
        from vllm.exceptions import VLLMValidationError

        extra = getattr(params, "extra_args", None)
        if not extra or cfg.KEY not in extra:
            return None
        name = extra[cfg.KEY]
        if not isinstance(name, str):
            raise VLLMValidationError(f"fastpatch: the patch must be named by a string, got {name!r}",
                                      parameter=cfg.KEY, value=name)
        with self.lock:
            if name not in self.salts:
                raise VLLMValidationError(
                    f"fastpatch: unknown patch {name!r}; this server has {sorted(self.salts)}",
                    parameter=cfg.KEY, value=name)
            return self.salts[name]

    def loaded(self, name: str, path: str) -> None:
        with self.lock:
            self.salts[name] = _salt(name, file_digest(path))

    def unloaded(self, name: str) -> None:
        with self.lock:
            self.salts.pop(name, None)


def _salt(name: str, digest: str) -> str:
    return f"fastpatch:{name}:{digest}"


def front_of(processor) -> Optional[FrontEnd]:
    """The FrontEnd of an InputProcessor (built on first use), None without a fastpatch section."""
    front = processor.__dict__.get("_fastpatch_front", False)
    if front is False:
        raw = cfg.section(processor.vllm_config.additional_config)
        front = None if raw is None else FrontEnd(cfg.parse(raw))
        processor.__dict__["_fastpatch_front"] = front
    return front


def wrap_process_inputs(vanilla):
    """InputProcessor.process_inputs with the fastpatch check. Without a fastpatch section it passes every
    request through unchanged, except one that names a patch: that one is refused, never run unpatched."""

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        front = front_of(self)
        if front is None:
            extra = getattr(params, "extra_args", None)
            if extra and cfg.KEY in extra:  # it would run unpatched without a word: refuse it instead
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(
                    f"fastpatch: the request names patch {extra[cfg.KEY]!r}, but this engine was started without "
                    "additional_config['fastpatch']", parameter=cfg.KEY, value=extra[cfg.KEY])
            return vanilla(self, request_id, prompt, params, *args, **kwargs)
        salt = front.check(params)
        request = vanilla(self, request_id, prompt, params, *args, **kwargs)
        if salt is not None:
            request.cache_salt = salt if not request.cache_salt else f"{request.cache_salt}|{salt}"
        return request

    process_inputs._fastpatch_wrapped = True
    process_inputs.__wrapped__ = vanilla
    return process_inputs
