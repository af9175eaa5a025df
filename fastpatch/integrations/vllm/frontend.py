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
from . import sae as sae_req
from .slots import file_digest


class FrontEnd:
    """The allowlist of patch names (declared + loaded at run time) and their cache salts."""

    def __init__(self, conf: cfg.PluginConfig):
        self.conf = conf
        self.lock = threading.Lock()
        self.salts = {name: _salt(name, file_digest(path)) for name, path in conf.patches.items()}
        self.saes = sae_req.load_all(conf) if conf.saes else {}  # name -> (SAE, digest of its files)

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
        params, sae_salt = _sae_params(front, params)  # an SAE feature config: checked, made canonical
        salt = front.check(params)
        request = vanilla(self, request_id, prompt, params, *args, **kwargs)
        if salt is not None:
            request.cache_salt = salt if not request.cache_salt else f"{request.cache_salt}|{salt}"
        if sae_salt is not None:
            request.cache_salt = sae_salt if not request.cache_salt else f"{request.cache_salt}|{sae_salt}"
        return request

    process_inputs._fastpatch_wrapped = True
    process_inputs.__wrapped__ = vanilla
    return process_inputs


def _sae_params(front: FrontEnd, params):
    """(params, salt) for a request whose section is an SAE feature config (``{"sae": ..., "clamp": ...}``):
    checked against the declared SAEs (VLLMValidationError naming the field, nothing runs) and made canonical.
    The params the engine sees are a copy (the caller's may be shared by several prompts) that carries the
    canonical config under ``sae.CONFIG_KEY`` and no fastpatch key. Any other request: (params, None)."""
    extra = getattr(params, "extra_args", None)
    if not extra:
        return params, None
    from vllm.exceptions import VLLMValidationError

    reserved = [k for k in (sae_req.CONFIG_KEY, sae_req.ROW_KEY) if k in extra]
    if reserved:
        raise VLLMValidationError(f"fastpatch: extra_args {reserved} are written by fastpatch, not by a request; "
                                  "edit SAE features with extra_args={'fastpatch': {'sae': ..., 'clamp': ...}}",
                                  parameter=reserved[0], value=extra[reserved[0]])
    value = extra.get(cfg.KEY)
    if not sae_req.is_sae_request(value):
        return params, None
    if not front.saes:
        raise VLLMValidationError("fastpatch: the request edits SAE features, but this server declares no saes "
                                  "(additional_config['fastpatch']['saes'])", parameter=cfg.KEY, value=value)
    try:
        canonical = sae_req.normalize(value, front.saes, front.conf.max_sae_features)
    except sae_req.SAERequestError as exc:
        raise VLLMValidationError(str(exc), parameter=cfg.KEY, value=value) from None
    params = params.clone()
    rest = {k: v for k, v in extra.items() if k != cfg.KEY}
    rest[sae_req.CONFIG_KEY] = canonical
    params.extra_args = rest
    return params, sae_req.salt(canonical)
