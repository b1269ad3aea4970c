"""Whether Triton runs its kernels in its interpreter, decided once for every caller.

Triton reads ``TRITON_INTERPRET`` as a boolean (``1``, ``true``, ``yes``, ``on``, any case);
the dispatcher (may the triton backend take CPU tensors?) and the launchers (how large a grid
to use) must read it the same way, or ``TRITON_INTERPRET=true`` would interpret the kernels
while the dispatcher refused CPU tensors.
"""

from __future__ import annotations

import os

__all__ = ["triton_interpreting"]

_TRUE = frozenset({"1", "true", "yes", "on", "y"})


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to interpret kernels (read at each call)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE
