"""fastpatch inside vLLM: per-request patches through a ``vllm.general_plugins`` entry point.

```python
llm = LLM(model=folder, additional_config={"fastpatch": {"patches": {"calm": "calm.safetensors"}}})
llm.generate(prompts, SamplingParams(extra_args={"fastpatch": "calm"}))
```

:func:`register` is the entry point; vLLM calls it in every process. It wraps vLLM methods that are all
pass-throughs unless the engine's ``additional_config`` has a ``fastpatch`` section:

- ``VllmConfig.__post_init__`` and ``InputProcessor.__init__`` (engine start, before any worker exists): an
  engine that declares patches refuses to start (:class:`FastpatchStartError`) when a piece below could not
  be hooked in this vLLM, or when it would run a model runner fastpatch does not attach to.
- ``InputProcessor.process_inputs`` (front end): the request's patch name must be declared
  (``VLLMValidationError`` otherwise), and its ``cache_salt`` keeps its KV blocks apart.
- the model runner's ``load_model`` (worker): after the weights load, the patch files are read and
  checked against the model, banks are built and the sites' norms get a patched forward, all before
  vLLM traces the model; every site is checked and one patched norm is self-tested against the float64
  reference (the start fails otherwise); every step then fills the per-token slot index.
- ``Scheduler.schedule``, ``_handle_blocked_waiting_request`` and ``_free_request`` (engine core; only for
  an engine that declares ``saes``): per-request SAE feature configs take bank rows, shared by identical
  configs; a config that finds no free row waits for a later step (see ``sae``).
- the worker's ``load_model``: a last net that refuses the start if the runner loaded the model without
  fastpatch attaching.
- ``LLMEngine.__init__`` / ``AsyncLLM.__init__`` and ``OutputProcessor._finish_request`` (front end):
  the front end learns its engine (a governed engine's bridge starts there, see ``frontend``) and each
  request's end (tokens, so the bridge can count them and free a version's slot).

An installed vLLM outside :data:`TESTED_RANGE` gets a warning (once).

See docs/vllm.md.
"""
from __future__ import annotations

from .compat import TESTED_RANGE, FastpatchStartError
from .config import KEY, FastpatchConfigError, PluginConfig, parse
from .model import SUPPORTED, UnsupportedModelError
from .slots import PatchSlotError
from .worker import WorkerExtension

__all__ = ["KEY", "FastpatchConfigError", "FastpatchStartError", "PatchSlotError", "PluginConfig", "SUPPORTED",
           "UnsupportedModelError", "TESTED_RANGE", "WorkerExtension", "fire_counts", "load_patch", "parse",
           "register", "unload_patch"]


# Where register() hooks in. A vLLM release that moves one of these must never leave an engine that
# declares patches serving requests unpatched: what could not be hooked is recorded in _PROBLEMS, and an
# engine with a fastpatch section refuses to start (check_start, attach, _checked_worker_load).
_RUNNERS = {"cpu": ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
            "gpu": ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")}
_CONFIG = ("vllm.config", "VllmConfig")
_INPUT_PROCESSOR = ("vllm.v1.engine.input_processor", "InputProcessor")
_WORKER = ("vllm.v1.worker.gpu_worker", "Worker")  # the CPU worker subclasses it
_SCHEDULER = ("vllm.v1.core.sched.scheduler", "Scheduler")  # AsyncScheduler subclasses it
_SCHEDULER_METHODS = ("schedule", "_handle_blocked_waiting_request", "_free_request")
_ENGINES = (("vllm.v1.engine.llm_engine", "LLMEngine"), ("vllm.v1.engine.async_llm", "AsyncLLM"))
_OUTPUT = ("vllm.v1.engine.output_processor", "OutputProcessor")
_PROBLEMS: dict = {}  # "module.Class.method" -> why it could not be wrapped (in this process)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent: vLLM may call it more than once).

    Never raises: vLLM calls it unguarded for every engine, and an engine without a fastpatch section
    must keep working on any vLLM. What cannot be hooked is logged and recorded; engines that declare
    patches then refuse to start, naming it."""
    from .compat import check_version

    check_version()
    _hook(_CONFIG, "__post_init__", _wrap_config_post_init)
    _hook(_INPUT_PROCESSOR, "__init__", _wrap_input_processor_init)
    from .frontend import wrap_process_inputs

    _hook(_INPUT_PROCESSOR, "process_inputs", wrap_process_inputs)
    _hook(_WORKER, "load_model", _wrap_worker_load_model)
    from . import sae

    for method, wrap in zip(_SCHEDULER_METHODS, (sae.wrap_schedule, sae.wrap_handle_blocked, sae.wrap_free_request)):
        _hook(_SCHEDULER, method, wrap)
    for where in _ENGINES:
        _hook(where, "__init__", _wrap_engine_init)
    _hook(_OUTPUT, "_finish_request", _wrap_finish_request)
    for module, cls_name in _RUNNERS.values():
        _hook((module, cls_name), "load_model", _wrap_runner_load_model)


def _hook(where, method: str, wrap) -> None:
    """Replace ``module.Class.method`` by ``wrap(original)`` once; record (and log) why it cannot be."""
    import importlib
    import logging

    module, cls_name = where
    name = f"{module}.{cls_name}.{method}"
    try:
        cls = getattr(importlib.import_module(module), cls_name)
        vanilla = cls.__dict__.get(method)
        if vanilla is None:
            raise AttributeError(f"{cls_name} defines no {method}")
    except Exception as exc:  # noqa: BLE001 - any failure here means "this vLLM is laid out differently"
        _PROBLEMS[name] = f"{type(exc).__name__}: {exc}"
        logging.getLogger("fastpatch.vllm").warning(
            "fastpatch: cannot hook %s (%s); an engine with additional_config['fastpatch'] will refuse to start",
            name, _PROBLEMS[name])
        return
    _PROBLEMS.pop(name, None)
    if getattr(vanilla, "_fastpatch_wrapped", False):
        return
    wrapped = wrap(vanilla)
    wrapped._fastpatch_wrapped = True
    wrapped.__wrapped__ = vanilla
    setattr(cls, method, wrapped)


def _wrap_runner(module: str, cls_name: str) -> None:
    """Wrap one model runner's ``load_model`` (kept for callers of the old helper)."""
    _hook((module, cls_name), "load_model", _wrap_runner_load_model)


def _wrap_runner_load_model(vanilla):
    def load_model(self, *args, **kwargs):
        result = vanilla(self, *args, **kwargs)
        from . import config as cfg
        from .worker import attach

        if cfg.section(self.vllm_config.additional_config) is not None:
            # This process's front end cannot check names or salt the cache: the engine core refuses too.
            _refuse_without_front_end()
        attach(self)
        return result

    return load_model


def _wrap_worker_load_model(vanilla):
    """The worker's load_model: the net under the runner's. If the runner that actually ran is one
    fastpatch did not wrap (a new runner class, Model Runner V2, a moved load_model), nothing attached:
    stop here rather than serve."""

    def load_model(self, *args, **kwargs):
        result = vanilla(self, *args, **kwargs)
        _checked_worker_load(self)
        return result

    return load_model


def _checked_worker_load(worker) -> None:
    from . import config as cfg
    from .compat import refuse

    runner = getattr(worker, "model_runner", None)
    vllm_config = getattr(worker, "vllm_config", None) or getattr(runner, "vllm_config", None)
    if cfg.section(getattr(vllm_config, "additional_config", None)) is None:
        return
    if getattr(runner, "_fastpatch", None) is None:
        kind = type(runner)
        raise refuse(f"the model runner {kind.__module__}.{kind.__qualname__} loaded the model but fastpatch did "
                     "not attach to it (its load_model is not the one fastpatch wraps: "
                     f"{_RUNNERS['cpu'][0]}.{_RUNNERS['cpu'][1]} / {_RUNNERS['gpu'][0]}.{_RUNNERS['gpu'][1]})")


def _wrap_engine_init(vanilla):
    """LLMEngine / AsyncLLM __init__: tell the front end its engine (and the output processor its front end)."""

    def __init__(self, *args, **kwargs):
        vanilla(self, *args, **kwargs)
        from .frontend import front_of

        processor = getattr(self, "input_processor", None)
        front = front_of(processor) if processor is not None else None
        if front is not None:
            output = getattr(self, "output_processor", None)
            if output is not None:
                output.__dict__["_fastpatch_front"] = front
            front.bind(self)

    return __init__


def _wrap_finish_request(vanilla):
    def _finish_request(self, req_state, *args, **kwargs):
        result = vanilla(self, req_state, *args, **kwargs)
        front = self.__dict__.get("_fastpatch_front")
        if front is not None and front.resolver is not None:
            ext = getattr(req_state, "external_req_id", None)
            if ext is not None and ext not in self.external_req_ids:  # the last child of an n > 1 request
                det = getattr(req_state, "detokenizer", None)
                out = det.num_output_tokens() if det is not None else 0
                front.finished(ext, int(getattr(req_state, "prompt_len", 0) or 0), int(out))
        return result

    return _finish_request


def _wrap_config_post_init(vanilla):
    """VllmConfig.__post_init__: the earliest point that sees an engine's additional_config, in the
    process that starts the engine, before any worker process exists."""

    def __post_init__(self, *args, **kwargs):
        result = vanilla(self, *args, **kwargs)
        check_start(self)
        return result

    return __post_init__


def _wrap_input_processor_init(vanilla):
    """InputProcessor.__init__: the front end's own start (before LLMEngine/AsyncLLM start the engine
    core); the same check as VllmConfig's, for a vLLM where that hook is missing."""

    def __init__(self, vllm_config, *args, **kwargs):
        check_start(vllm_config)
        return vanilla(self, vllm_config, *args, **kwargs)

    return __init__


def check_start(vllm_config) -> None:
    """Refuse (FastpatchStartError) an engine that declares patches when this vLLM lacks a piece the
    plugin needs: the front end's request check, or a model runner whose load_model fastpatch wrapped.
    A pass-through for an engine without a fastpatch section."""
    from . import config as cfg
    from .compat import refuse

    if cfg.section(getattr(vllm_config, "additional_config", None)) is None:
        return
    _refuse_without_front_end()
    problem = runner_problem(vllm_config)
    if problem is not None:
        raise refuse(problem)
    _check_saes(vllm_config)
    if cfg.governed(vllm_config.additional_config[cfg.KEY]) is not None:
        _check_governed(vllm_config)


def _check_governed(vllm_config) -> None:
    """An engine serving governed patch sets needs a registered bridge, the worker extension (versions are
    loaded at run time) and the engine / output-processor hooks (the bridge's start, each request's end)."""
    from .compat import refuse
    from .frontend import bridge_factory

    bridge_factory()
    ext = getattr(getattr(vllm_config, "parallel_config", None), "worker_extension_cls", "")
    if ext != f"{__name__}.WorkerExtension":
        raise refuse(f"governed patch sets are loaded into the workers at run time: start the engine with "
                     f"worker_extension_cls='{__name__}.WorkerExtension' (vllm serve: --worker-extension-cls), "
                     f"not {ext!r}")
    missing = [n for n in _PROBLEMS if n.startswith((_ENGINES[0][0], _ENGINES[1][0], _OUTPUT[0]))]
    if missing:
        raise refuse("governed patch sets need hooks this vLLM does not allow (" +
                     "; ".join(f"{n}: {_PROBLEMS[n]}" for n in missing) + ")")


def _refuse_without_front_end() -> None:
    from .compat import refuse

    front = [n for n in _PROBLEMS if n.startswith(_INPUT_PROCESSOR[0])]
    if front:
        raise refuse("the front end's request check cannot be installed (" +
                     "; ".join(f"{n}: {_PROBLEMS[n]}" for n in front) + ")")


def runner_problem(vllm_config):
    """Why the model runner this engine will use would not get fastpatch's load_model, or None."""
    import importlib

    try:
        v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
    except Exception:  # noqa: BLE001 - vLLM raises its own error for a bad config later
        v2 = False
    if v2:
        return ("this engine would run vLLM's Model Runner V2 (vllm.v1.worker.gpu.model_runner / cpu.model_runner), "
                "which the plugin does not attach to; set VLLM_USE_V2_MODEL_RUNNER=0 to use the V1 runner")
    try:
        from vllm.platforms import current_platform

        kind = "cpu" if current_platform.is_cpu() else "gpu"
    except Exception as exc:  # noqa: BLE001
        return f"vllm.platforms.current_platform cannot be read ({type(exc).__name__}: {exc})"
    module, cls_name = _RUNNERS[kind]
    name = f"{module}.{cls_name}.load_model"
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except Exception as exc:  # noqa: BLE001
        return f"the model runner {module}.{cls_name} cannot be found ({type(exc).__name__}: {exc})"
    method = getattr(cls, "load_model", None)
    if method is None:
        return f"the model runner {module}.{cls_name} has no load_model"
    if not getattr(method, "_fastpatch_wrapped", False):
        why = _PROBLEMS.get(name, "it is not fastpatch's wrapper")
        return f"{name} could not be wrapped ({why})"
    return None


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
    _not_governed(front)
    slots = llm.collective_rpc("fastpatch_load", args=(name, str(path)))
    front.loaded(name, str(path))
    return slots[0]


def unload_patch(llm, name: str) -> int:
    """Remove patch ``name`` (its slot becomes free); later requests naming it get an error."""
    from .frontend import front_of

    front = front_of(_engine(llm).input_processor)
    if front is None:
        raise RuntimeError("fastpatch is not active in this engine")
    _not_governed(front)
    front.unloaded(name)
    return llm.collective_rpc("fastpatch_unload", args=(name,))[0]


def fire_counts(llm) -> dict:
    """{patch name: {site: count}}: for each patch, the token rows it applied to at each site it touches
    (its gate fired, or it has no gate), counted by the kernels and summed since the engine started.

    Every token a step runs through a site counts: prompt tokens (minus prefix-cache hits, which skip the
    forward) and each decode step's input token. Cumulative: a reader computes deltas. A name unloaded keeps
    its final totals (and continues from them if loaded again); a slot taken by another patch starts at 0.
    Resident SAE rows appear as ``sae:<config hash>``. Needs
    ``worker_extension_cls="fastpatch.integrations.vllm.WorkerExtension"``. With tensor parallelism every
    rank runs every token through the norms, so rank 0's counts are returned.
    """
    return llm.collective_rpc("fastpatch_fire_counts")[0]


def _not_governed(front) -> None:
    if front.governed is not None:
        raise RuntimeError("this engine serves governed patch sets: its slots follow the store; change them through "
                           "fastpatch.lifecycle.Governance (publish, canary, promote, abort, expire), not load_patch")


def _check_saes(vllm_config) -> None:
    """An engine declaring ``saes``: the scheduler that admits SAE configs to rows must be fastpatch's (else a
    config could run without a row), and every SAE must fit the model (site, d_in); refused at start."""
    from . import config as cfg
    from . import sae
    from .compat import FastpatchStartError, refuse

    conf = cfg.parse(vllm_config.additional_config[cfg.KEY])
    if not conf.saes:
        return
    missing = [n for n in _PROBLEMS if n.startswith(f"{_SCHEDULER[0]}.{_SCHEDULER[1]}.")]
    if missing:
        raise refuse("per-request SAE configs need vLLM's scheduler hooks (" +
                     "; ".join(f"{n}: {_PROBLEMS[n]}" for n in missing) + ")")
    try:
        cls = vllm_config.scheduler_config.get_scheduler_cls()
    except Exception as exc:  # noqa: BLE001
        raise refuse(f"the scheduler class cannot be read ({type(exc).__name__}: {exc})") from None
    plain = [m for m in _SCHEDULER_METHODS if not getattr(getattr(cls, m, None), "_fastpatch_wrapped", False)]
    if plain:
        raise refuse(f"the scheduler {cls.__module__}.{cls.__qualname__} does not run fastpatch's SAE row admission "
                     f"({', '.join(plain)} not fastpatch's); use vLLM's Scheduler / AsyncScheduler (no scheduler_cls)")
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:  # the workers check against the loaded model
        return
    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    try:
        sae.check_model(sae.load_all(conf), int(hf.num_hidden_layers), int(hf.hidden_size))
    except ValueError as exc:
        raise FastpatchStartError(f"{exc}. The engine does not start: fix the 'saes' option.") from None
