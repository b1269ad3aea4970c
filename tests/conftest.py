"""Session-wide test setup.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. The variable
must be set before any Triton kernel is defined, so it is set here, before the tests import
xai_serve. On a GPU machine the kernels are compiled for the device as usual.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
