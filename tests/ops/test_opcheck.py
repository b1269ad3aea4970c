"""torch.library.opcheck on every registered op: schema, fake kernels, autograd registration,
and tracing under AOT autograd with dynamic shapes (what torch.compile relies on)."""

from __future__ import annotations

import pytest
import torch

from tests.ops.conftest import HAS_CUDA
from xai_serve import ops

pytestmark = pytest.mark.skipif(
    not ops.backend_info()["available"]["cpu"], reason="extension not built"
)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA and ops.backend_info()["available"]["cuda"] else [])


def _cases(device):
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(2, 4, 5, 6, generator=g)
    images = torch.rand(2, 3, 8, 9, generator=g)
    segments = torch.randint(0, 6, (2, 8, 9), generator=g)
    keep = torch.rand(2, 4, 6, generator=g) > 0.5
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    t = {
        k: v.to(device)
        for k, v in dict(
            acts=acts, images=images, segments=segments, keep=keep, mean=mean, std=std
        ).items()
    }
    return [
        (
            torch.ops.xai_serve.cam_fuse.default,
            (t["acts"], torch.randn(2, 4, device=device), [11, 13], True, True),
        ),
        (
            torch.ops.xai_serve.cam_fuse.default,
            (t["acts"].half(), torch.randn(2, 4, 5, 6, device=device).half(), [3, 3], False, False),
        ),
        (
            torch.ops.xai_serve.superpixel_mask.default,
            (t["images"], t["segments"], t["keep"], None, 0.5, t["mean"], t["std"], True),
        ),
        (
            torch.ops.xai_serve.superpixel_mask.default,
            (
                t["images"],
                t["segments"].int(),
                t["keep"],
                torch.rand(2, 3, 6, device=device),
                0.0,
                None,
                None,
                False,
            ),
        ),
        (
            torch.ops.xai_serve.superpixel_mask.default,
            (
                t["images"].bfloat16(),
                t["segments"],
                t["keep"].byte(),
                t["images"].bfloat16(),
                0.0,
                None,
                None,
                True,
            ),
        ),
        # channels_last output (the fake kernel must give the same strides), from NCHW and
        # channels_last images, with each baseline kind, and with one channel
        (
            torch.ops.xai_serve.superpixel_mask.default,
            (t["images"], t["segments"], t["keep"], None, 0.5, t["mean"], t["std"], True, True),
        ),
        (
            torch.ops.xai_serve.superpixel_mask.default,
            (
                t["images"].half().contiguous(memory_format=torch.channels_last),
                t["segments"].int(),
                t["keep"].byte(),
                torch.rand(2, 3, 6, device=device).half(),
                0.0,
                None,
                None,
                False,
                True,
            ),
        ),
        (
            torch.ops.xai_serve.superpixel_mask.default,
            (
                t["images"].bfloat16(),
                t["segments"],
                t["keep"],
                t["images"].bfloat16().contiguous(memory_format=torch.channels_last),
                0.0,
                t["mean"],
                t["std"],
                True,
                True,
            ),
        ),
        (
            torch.ops.xai_serve.superpixel_mask.default,
            (t["images"][:, :1], t["segments"], t["keep"], None, 0.25, None, None, True, True),
        ),
        (torch.ops.xai_serve.segment_mean.default, (t["images"], t["segments"], 6, True)),
        (
            torch.ops.xai_serve.segment_mean.default,
            (t["images"].half(), t["segments"].int(), 9, False),
        ),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_compile_with_torch_compile(device):
    acts, weights = torch.randn(2, 4, 7, 7, device=device), torch.randn(2, 4, device=device)

    def f(a, w):
        return torch.ops.xai_serve.cam_fuse(a, w, [32, 32], True, True) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(acts, weights), 2 * ops.cam_fuse_reference(acts, weights, (32, 32))
    )
