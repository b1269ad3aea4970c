"""attention_residual: the C++ kernel equals the reference (the former per-layer rollout
maths), the dropped set is exactly the ``drop`` smallest entries also with ties, and bad input
is the same clear error on every backend."""

from __future__ import annotations

import pytest
import torch

from tests.ops.conftest import NEEDS_GPU, TOL
from xai_serve import InvalidInput, Unavailable, ops

BUILT = ops.backend_info()["available"]["cpu"]
needs_build = pytest.mark.skipif(not BUILT, reason="extension not built")


def fused_attention(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Head-fused softmax probabilities: rows summing to 1, a wide spread of values."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.softmax(torch.randn(m, 3, n, n, generator=g) * 3.0, dim=-1)
    return heads.mean(dim=1)


@needs_build
@pytest.mark.parametrize("shape", [(4, 7), (3, 50), (2, 197), (1, 1), (5, 2)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_kernel_equals_the_reference(shape: tuple[int, int], ratio: float) -> None:
    a = fused_attention(*shape)
    want = ops.attention_residual(a, ratio, backend="reference")
    got = ops.attention_residual(a, ratio, backend="cpu")
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert ops.backend_info()["last_used"]["attention_residual"] == "cpu"
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:2]))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_build)])
def test_the_class_tokens_own_entry_is_never_dropped(backend: str) -> None:
    a = fused_attention(2, 6)
    a[:, torch.arange(6), torch.arange(6)] = 1.0  # the diagonal is never among the dropped...
    a[:, 0, 0] = 0.0  # ...but for the class token's entry, the smallest of both matrices
    drop = int(36 * 0.5)
    out = ops.attention_residual(a, 0.5, backend=backend)
    # kept at 0.5 * 0 + 0.5 (the identity) before the row's normalisation, and counted among the
    # dropped: drop - 1 off-diagonal zeros remain from the rest of the smallest
    dropped = (out == 0).flatten(1).sum(1)
    assert dropped.tolist() == [drop - 1, drop - 1]
    assert bool((out[:, 0, 0] > 0).all())


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_build)])
def test_ties_drop_exactly_the_count_and_never_a_larger_value(backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    # values from a small set: many ties straddle the boundary
    a = torch.randint(1, 4, (3, 9, 9), generator=g).float() / 10
    # the diagonal (including the class token's entry) holds the largest value: never dropped,
    # so the dropped entries are exactly the output's zeros
    a[:, torch.arange(9), torch.arange(9)] = 0.4
    ratio = 0.37
    drop = int(81 * ratio)
    out = ops.attention_residual(a, ratio, backend=backend)
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 9))
    for m in range(3):
        zeroed = out[m] == 0
        assert int(zeroed.sum()) == drop
        assert float(a[m][zeroed].max()) <= float(a[m][~zeroed].min())


@needs_build
def test_kernel_drops_the_first_equal_entries_in_index_order() -> None:
    a = torch.full((1, 4, 4), 0.25)
    a[0, 0, 0] = 0.5  # not among the smallest
    out = ops.attention_residual(a, 0.25, backend="cpu")  # drop 4 of the 15 equal entries
    zeroed = (out[0] == 0).flatten().nonzero().flatten().tolist()
    # row-major order, skipping the diagonal (its identity share is never zero): 1, 2, 3, 4
    assert zeroed == [1, 2, 3, 4]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_build)])
def test_bad_input_is_a_clear_error(backend: str) -> None:
    a = fused_attention(2, 5)
    with pytest.raises(InvalidInput, match=r"Tensor\[M, N, N\]"):
        ops.attention_residual(a[0], 0.5, backend=backend)
    with pytest.raises(InvalidInput, match=r"Tensor\[M, N, N\]"):
        ops.attention_residual(a[:, :4], 0.5, backend=backend)
    with pytest.raises(InvalidInput, match="float32"):
        ops.attention_residual(a.double(), 0.5, backend=backend)
    for ratio in (1.0, -0.1, True, "0.5", float("nan")):
        with pytest.raises(InvalidInput, match=r"discard_ratio.*\[0, 1\)"):
            ops.attention_residual(a, ratio, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"torch\.Tensor"):
        ops.attention_residual([[0.5]], 0.5, backend=backend)  # type: ignore[arg-type]


@needs_build
def test_direct_calls_check_their_arguments() -> None:
    a = fused_attention(1, 3)
    with pytest.raises(RuntimeError, match=r"`drop` must lie in \[0, N \* N\)"):
        torch.ops.xai_serve.attention_residual(a, 9)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.xai_serve.attention_residual(a.half(), 1)


def test_backends_this_op_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    a = fused_attention(1, 4)
    with pytest.raises(Unavailable, match="'reference', 'cpu', 'cuda' backends only"):
        ops.attention_residual(a, 0.5, backend="triton")
    with pytest.raises(Unavailable, match="takes CUDA tensors"):
        ops.attention_residual(a, 0.5, backend="cuda")
    # the environment forces a backend for the ops that have it; this one then chooses itself
    monkeypatch.setenv("XAI_SERVE_BACKEND", "triton")
    ops.attention_residual(a, 0.5)
    expected = "cpu" if BUILT else "reference"
    assert ops.backend_info()["last_used"]["attention_residual"] == expected


@needs_build
def test_opcheck() -> None:
    a = fused_attention(3, 6)
    torch.library.opcheck(torch.ops.xai_serve.attention_residual.default, (a, 10))
    torch.library.opcheck(torch.ops.xai_serve.attention_residual.default, (a, 0))


@NEEDS_GPU
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_cuda_registration_equals_the_reference(ratio: float) -> None:
    a = fused_attention(4, 197).cuda()
    want = ops.attention_residual(a, ratio, backend="reference")
    got = ops.attention_residual(a, ratio, backend="cuda")
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert ops.backend_info()["last_used"]["attention_residual"] == "cuda"


@needs_build
def test_kernel_equals_the_reference_on_signed_values_and_odd_sizes() -> None:
    # the selection orders float bit patterns: negative values and zeros of both signs too
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        m, n = (
            int(torch.randint(1, 4, (1,), generator=g)),
            int(torch.randint(1, 30, (1,), generator=g)),
        )
        ratio = float(torch.rand(1, generator=g)) * 0.999
        a = torch.randn(m, n, n, generator=g) * 4
        a[a.abs() < 0.3] = 0.0
        a[a.abs() > 3.5] = -0.0
        want = ops.attention_residual(a, ratio, backend="reference")
        got = ops.attention_residual(a, ratio, backend="cpu")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
