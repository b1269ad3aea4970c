"""Session-wide test setup.

Tuning measurements and compiled forwards (``xai_serve.models.tuning``) are kept under
``$XDG_CACHE_HOME/xai_serve``; the tests point that at a folder of their own (shared by the
session, its server processes included) so that they neither read nor fill the user's cache.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The variable
must be set before any Triton kernel is defined, so it is set here, before the tests import
xai_serve. On a GPU machine the kernels are compiled for the device as usual.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from tests._peers import REQUIRE_EXTENSIONS_ENV, extensions_required

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="xai-serve-tests-cache-")

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under ``XAI_SERVE_REQUIRE_EXTENSIONS=1`` (set by ``.ci/run``) a missing or broken
    compiled extension stops the run with an error, instead of letting the tests that need it
    skip (tests/_peers.py has the switch; ``XAI_SERVE_REQUIRE_PEERS`` does the same for peer
    packages, test by test)."""
    if not extensions_required():
        return
    from xai_serve import ops

    info = ops.backend_info()
    if not info["available"]["cpu"]:
        raise pytest.UsageError(
            f"{REQUIRE_EXTENSIONS_ENV}=1 but the compiled extension xai_serve._C is not "
            f"available ({info['extension_error'] or 'not built'}); build it with `make setup` "
            "(or pip install --no-build-isolation -e .)"
        )
