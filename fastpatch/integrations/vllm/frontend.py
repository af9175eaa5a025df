"""The front end (the process that takes requests): check the patch a request names, salt its KV cache.

Runs in vLLM's ``InputProcessor`` before a request reaches the engine, so an unknown patch name is a
``VLLMValidationError`` (HTTP 400 on the server) and never a silently unpatched generation. The request's
``cache_salt`` gets the patch's name and file digest: vLLM's prefix cache hashes the salt into the first
block, so patched and unpatched requests (or two versions of one patch) never share KV blocks.

Governed patch sets (the section has ``store`` and ``patch_sets``, :func:`.config.governed`): a request's
section is then a dict (``{"set": ..., "key": ..., "labels": ..., "patch": ...}``) that a *bridge* resolves.
This package only offers the extension point; the bridge lives in a layer above (it needs the store and the
rollout), registers a factory with :func:`register_bridge`, and the engine refuses to start without one.
When the engine object exists (``LLMEngine`` / ``AsyncLLM`` ``__init__``), :meth:`FrontEnd.bind` calls
``factory(front, engine, governed)``, which returns the resolver:

- ``resolver.resolve(request_id, section) -> Optional[str]``: the slot name the request is served with (a
  loaded one, kept loaded until the request ends) or None (served unpatched on purpose: the request's
  choice is "no patch"); ValueError / KeyError for a request it refuses (HTTP 400, nothing runs);
- ``resolver.released(request_id)``: the request will not run after all (a later check refused it);
- ``resolver.finished(request_id, prompt_tokens, output_tokens)``: the request ended (output processor).

The resolver loads slot contents with the engine's ``collective_rpc("fastpatch_load", name, path)`` (the
worker extension) and tells the front end with :meth:`FrontEnd.loaded` / :meth:`FrontEnd.unloaded`.
"""
from __future__ import annotations

import logging
import threading
import weakref
from typing import Optional

from . import config as cfg
from . import sae as sae_req
from .slots import file_digest


_BRIDGES: dict = {}  # name -> factory(front, engine, governed) -> resolver (see the module docstring)


def register_bridge(name: str, factory) -> None:
    """Register the factory of the resolver that serves governed patch sets (idempotent per name)."""
    _BRIDGES[name] = factory


def bridge_factory():
    """The registered bridge factory; FastpatchStartError naming the fix when there is none."""
    if not _BRIDGES:
        from .compat import refuse

        raise refuse("additional_config['fastpatch'] names a 'store' and 'patch_sets', but no bridge that serves "
                     "governed patch sets is registered in this process: install fastpatch with its entry points "
                     "(pip install -e .: vllm.general_plugins 'fastpatch_governed') and, if VLLM_PLUGINS is set, "
                     "add fastpatch_governed to it")
    return _BRIDGES[sorted(_BRIDGES)[0]]


def live_request_ids(engine) -> Optional[set]:
    """The external ids of the requests the engine's output processor still tracks (None if unreadable)."""
    tracked = getattr(getattr(engine, "output_processor", None), "external_req_ids", None)
    for _ in range(3):  # the event loop may change it while another thread copies it
        try:
            return set(tracked) if tracked is not None else None
        except RuntimeError:
            continue
    return None


class FrontEnd:
    """The allowlist of patch names (declared + loaded at run time) and their cache salts."""

    def __init__(self, conf: cfg.PluginConfig, governed=None):
        self.conf = conf
        self.governed = governed  # config.Governed or None
        self.resolver = None
        self._engine = None  # a weak reference: the engine owns this front end (no cycle to outlive it)
        self.lock = threading.Lock()
        self.salts = {name: _salt(name, file_digest(path)) for name, path in conf.patches.items()}
        self.saes = sae_req.load_all(conf) if conf.saes else {}  # name -> (SAE, digest of its files)

    @property
    def engine(self):
        """The engine this front end feeds, or None (not bound yet, or gone). Held weakly: a strong reference
        would make engine -> input processor -> front end -> engine a cycle, so a finished engine would be
        torn down by a later garbage collection, in the middle of the next engine's life (its shutdown
        destroys vLLM's process-wide parallel groups)."""
        return None if self._engine is None else self._engine()

    def bind(self, engine) -> None:
        """The engine this front end feeds (LLMEngine / AsyncLLM): governed sets get their resolver now."""
        self._engine = weakref.ref(engine)
        if self.governed is not None and self.resolver is None:
            self.resolver = bridge_factory()(self, engine, self.governed)

    def finished(self, request_id: str, prompt_tokens: int, output_tokens: int) -> None:
        if self.resolver is not None:
            try:
                self.resolver.finished(request_id, prompt_tokens, output_tokens)
            except Exception:  # noqa: BLE001 - never break vLLM's output loop; the bridge's own state is at fault
                logging.getLogger("fastpatch.vllm").exception("fastpatch: the bridge failed on request %s's end",
                                                              request_id)

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
        front = None if raw is None else FrontEnd(cfg.parse(raw), cfg.governed(raw))
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
        params = _json_section(params)  # the server's vllm_xargs carry no dicts: a section may come as JSON text
        params, sae_salt = _sae_params(front, params)  # an SAE feature config: checked, made canonical
        extra = getattr(params, "extra_args", None)
        resolved = extra is not None and isinstance(extra.get(cfg.KEY), dict)
        if resolved:
            params = _resolve(front, request_id, params)
        try:
            salt = front.check(params)
            request = vanilla(self, request_id, prompt, params, *args, **kwargs)
        except BaseException:
            if resolved:
                front.resolver.released(request_id)
            raise
        if salt is not None:
            request.cache_salt = salt if not request.cache_salt else f"{request.cache_salt}|{salt}"
        if sae_salt is not None:
            request.cache_salt = sae_salt if not request.cache_salt else f"{request.cache_salt}|{sae_salt}"
        return request

    process_inputs._fastpatch_wrapped = True
    process_inputs.__wrapped__ = vanilla
    return process_inputs


def _json_section(params):
    """A section given as JSON text (``vllm_xargs={"fastpatch": '{"set": "tone", "key": "u1"}'}``: the OpenAI
    server's ``vllm_xargs`` take strings, numbers and lists only) becomes the dict, in a copy of the params."""
    extra = getattr(params, "extra_args", None)
    value = extra.get(cfg.KEY) if extra else None
    if not isinstance(value, str) or not value.lstrip().startswith("{"):
        return params
    import json

    from vllm.exceptions import VLLMValidationError

    try:
        section = json.loads(value)
    except ValueError as exc:
        raise VLLMValidationError(f"fastpatch: the section is not valid JSON ({exc})", parameter=cfg.KEY,
                                  value=value) from None
    if not isinstance(section, dict):
        raise VLLMValidationError("fastpatch: a JSON section must be an object", parameter=cfg.KEY, value=value)
    params = params.clone()
    params.extra_args = dict(extra, **{cfg.KEY: section})
    return params


def _resolve(front: FrontEnd, request_id: str, params):
    """A governed request: the bridge picks the slot; the params the engine sees name it (a copy: the caller's
    SamplingParams may be shared by several prompts). Unpatched on purpose: the fastpatch key is dropped."""
    from vllm.exceptions import VLLMValidationError

    section = params.extra_args[cfg.KEY]
    if front.resolver is None:
        raise VLLMValidationError(f"fastpatch: the request names patch set {section.get('set')!r}, but this engine "
                                  "serves no governed patch sets (start it with 'store' and 'patch_sets')",
                                  parameter=cfg.KEY, value=section)
    try:
        name = front.resolver.resolve(request_id, section)
    except (ValueError, KeyError) as exc:
        raise VLLMValidationError(f"fastpatch: {exc.args[0] if exc.args else exc}", parameter=cfg.KEY,
                                  value=section) from None
    params = params.clone()
    rest = {k: v for k, v in params.extra_args.items() if k != cfg.KEY}
    if name is not None:
        rest[cfg.KEY] = name
    params.extra_args = rest or None
    return params


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
