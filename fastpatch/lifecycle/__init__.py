"""The patch lifecycle above the integrations: fit a patch from prompt pairs, evaluate it on a model,
publish / roll out / roll back versions (registry)."""
from .evaluation import evaluate
from .fitting import collect, fit
from .registry import Registry

__all__ = ["collect", "evaluate", "fit", "Registry"]
