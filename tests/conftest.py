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

import torch

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="xai-serve-tests-cache-")

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
