"""SAELens for the tests that use it as their oracle (tests/lifecycle/test_sae.py, test_sae_backends.py).

``import sae_lens`` changes the process: transformer-lens sets the ``transformers`` logger to ERROR and adds
warning filters, scikit-learn sets KMP_* variables, torch's inductor sets TORCHINDUCTOR_CACHE_DIR. The tests
after an SAELens test must see the process they would have seen without it, so :func:`import_sae_lens` puts
those back. Not installed: the test skips, saying how to install it; installed but broken: the import error
shows (a skip would hide it).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import pytest

NO_SAELENS = ("SAELens (the oracle of these tests) is not installed: its pip line is in scripts/install.sh "
              "(sae-lens==6.54.12 --no-deps plus the modules its import needs)")


def import_sae_lens():
    """The sae_lens module, imported with the process's logging levels, warning filters and environment kept."""
    if importlib.util.find_spec("sae_lens") is None:
        pytest.skip(NO_SAELENS)
    loggers = {name: logging.getLogger(name).level for name in ("transformers", "")}
    env = dict(os.environ)
    with warnings.catch_warnings():  # restores warnings.filters on exit
        import sae_lens
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    for key in set(os.environ) - set(env):
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    return sae_lens
