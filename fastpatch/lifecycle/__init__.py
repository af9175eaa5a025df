"""The patch lifecycle above the integrations: fit a patch from prompt pairs, evaluate it on a model,
publish / roll out / roll back versions (in memory: registry; persistent and governed: store, governance,
rollout, policy, telemetry, serving)."""
from .evaluation import evaluate
from .fitting import collect, fit
from .governance import Choice, Governance
from .policy import PolicyViolation
from .registry import Registry
from .serving import Served, Serving
from .pg_store import PostgresStore
from .store import SQLiteStore, Store, StoreError
from .stores import open_store

__all__ = ["collect", "evaluate", "fit", "Registry", "Choice", "Governance", "PolicyViolation", "Served",
           "Serving", "SQLiteStore", "PostgresStore", "Store", "StoreError", "open_store"]
