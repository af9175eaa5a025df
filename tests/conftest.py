import os

import torch

# Triton kernels run on CPU tensors only under the interpreter, and the variable must be set
# before any @triton.jit decorator runs, so it is set here, before fastpatch is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# A real PostgreSQL server for the store tests (skipped with the reason when it is not installed).
from pg_fixture import pg_server, pg_url  # noqa: E402,F401
