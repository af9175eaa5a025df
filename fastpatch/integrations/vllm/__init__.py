"""fastpatch inside vLLM: per-request patches through a ``vllm.general_plugins`` entry point.

```python
llm = LLM(model=folder, additional_config={"fastpatch": {"patches": {"calm": "calm.safetensors"}}})
llm.generate(prompts, SamplingParams(extra_args={"fastpatch": "calm"}))
```

:func:`register` is the entry point; vLLM calls it in every process. It wraps two vLLM methods, both
pass-throughs unless the engine's ``additional_config`` has a ``fastpatch`` section:

- ``InputProcessor.process_inputs`` (front end): the request's patch name must be declared
  (``VLLMValidationError`` otherwise), and its ``cache_salt`` keeps its KV blocks apart.
- the model runner's ``load_model`` (worker): after the weights load, the patch files are read and
  checked against the model, banks are built and the sites' norms get a patched forward, all before
  vLLM traces the model; every step then fills the per-token slot index.

See docs/vllm.md.
"""
from __future__ import annotations

from .config import KEY, FastpatchConfigError, PluginConfig, parse
from .model import SUPPORTED, UnsupportedModelError
from .slots import PatchSlotError
from .worker import WorkerExtension

__all__ = ["KEY", "FastpatchConfigError", "PatchSlotError", "PluginConfig", "SUPPORTED", "UnsupportedModelError",
           "WorkerExtension", "load_patch", "parse", "register", "unload_patch"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent: vLLM may call it more than once)."""
    from vllm.v1.engine.input_processor import InputProcessor

    from .frontend import wrap_process_inputs

    if not getattr(InputProcessor.process_inputs, "_fastpatch_wrapped", False):
        InputProcessor.process_inputs = wrap_process_inputs(InputProcessor.process_inputs)
    _wrap_runner("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
    _wrap_runner("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")


def _wrap_runner(module: str, cls_name: str) -> None:
    import importlib

    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except Exception:  # a vLLM build without this runner (e.g. no CPU runner): nothing to wrap
        return
    vanilla = cls.__dict__.get("load_model")
    if vanilla is None or getattr(vanilla, "_fastpatch_wrapped", False):
        return

    def load_model(self, *args, **kwargs):
        result = vanilla(self, *args, **kwargs)
        from .worker import attach

        attach(self)
        return result

    load_model._fastpatch_wrapped = True
    load_model.__wrapped__ = vanilla
    cls.load_model = load_model


def _engine(llm):
    return getattr(llm, "llm_engine", llm)


def load_patch(llm, name: str, path: str) -> int:
    """Load (or replace) patch ``name`` from ``path`` into every worker at run time; returns its slot.

    The engine needs ``worker_extension_cls="fastpatch.integrations.vllm.WorkerExtension"`` and spare slots
    (or ``name`` already declared). Requests may name it once this returns.
    """
    from .config import check_name
    from .frontend import front_of

    check_name(name)
    front = front_of(_engine(llm).input_processor)
    if front is None:
        raise RuntimeError("fastpatch is not active in this engine: start it with additional_config={'fastpatch': ...}")
    slots = llm.collective_rpc("fastpatch_load", args=(name, str(path)))
    front.loaded(name, str(path))
    return slots[0]


def unload_patch(llm, name: str) -> int:
    """Remove patch ``name`` (its slot becomes free); later requests naming it get an error."""
    from .frontend import front_of

    front = front_of(_engine(llm).input_processor)
    if front is None:
        raise RuntimeError("fastpatch is not active in this engine")
    front.unloaded(name)
    return llm.collective_rpc("fastpatch_unload", args=(name,))[0]
