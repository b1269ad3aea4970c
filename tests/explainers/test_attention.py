"""Attention rollout, attention flow and attention-Grad-CAM against references written here.

The references never use the explainers' machinery: the attention probabilities are computed
from the blocks' own weights by a forward written out in this file (q, k, v from the
projection weights, ``softmax(q k^T / sqrt(d))``), and the formulas are the papers':

* rollout (Abnar & Zuidema 2020): full ``N x N`` matrices multiplied through the layers,
  ``rownorm(0.5 fuse(A) + 0.5 I)``, after vit-explain's drop of the lowest ``discard_ratio``
  of each fused matrix's entries (entry ``[0, 0]`` kept), one image at a time;
* attention flow: networkx's ``maximum_flow_value`` on the layered graph, built upwards (from
  each input patch to the class token of the last layer);
* attention-Grad-CAM (Chefer et al. 2021): ``R = I; R += mean_h(relu(dy/dA * A)) @ R`` with
  ``dy/dA`` taken by autograd through the written-out forward.

The reference's relevance goes through ``cam_fuse_reference`` (upsampling and min-max) and is
compared with the explainer's map. Models are tiny ViTs with random weights (torchvision and
timm, DeiT distilled, register tokens); their parameters are redrawn from a seeded normal, so
that the attentions are far from uniform and the heads are not zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tests._peers import require

torchvision = require("torchvision")
timm = require("timm")
nx = require("networkx")
require("scipy")

from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from torchvision.models import VisionTransformer  # noqa: E402

import xai_serve  # noqa: E402
from xai_serve import InvalidInput  # noqa: E402
from xai_serve.explainers import attention, get_method  # noqa: E402
from xai_serve.ops.reference import cam_fuse_reference  # noqa: E402

METHODS = ("attention_rollout", "attention_flow", "attention_gradcam")

# Maps are in [0, 1]; the explainer and the references differ by float32 rounding only
# (measured at most ~2e-6 here).
TOL = 1e-5


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _randomised(model: nn.Module, seed: int, std: float = 0.4) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tv_vit(seed: int = 0) -> nn.Module:
    return _randomised(
        VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
        ),
        seed,
    )


def timm_vit(seed: int = 1) -> nn.Module:
    return _randomised(
        timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=16,
            num_heads=2,
            depth=2,
            mlp_ratio=2.0,
            num_classes=10,
        ),
        seed,
    )


def timm_deit_distilled(seed: int = 2) -> nn.Module:
    return _randomised(
        VisionTransformerDistilled(
            img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
            num_classes=10,
        ),
        seed,
    )  # fmt: skip


def timm_registers(seed: int = 3) -> nn.Module:
    return _randomised(
        TimmViT(
            img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0,
            num_classes=10, reg_tokens=4,
        ),
        seed,
    )  # fmt: skip


MODELS: dict[str, Callable[[], nn.Module]] = {
    "torchvision": tv_vit,
    "timm": timm_vit,
    "deit_distilled": timm_deit_distilled,
    "timm_reg4": timm_registers,
}
PREFIX = {"torchvision": 1, "timm": 1, "deit_distilled": 2, "timm_reg4": 5}


def images(batch: int = 3, seed: int = 10) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# The written-out forward: logits and every layer's attention probabilities [B, H, N, N]
# --------------------------------------------------------------------------------------------


def _heads(z: Tensor, heads: int) -> Tensor:
    b, n, d = z.shape
    return z.view(b, n, heads, d // heads).transpose(1, 2)


def tv_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    b = x.shape[0]
    t = model._process_input(x)
    t = torch.cat([model.class_token.expand(b, -1, -1), t], dim=1) + model.encoder.pos_embedding
    t = t.detach().requires_grad_(True)  # the graph starts at the tokens
    attns = []
    for blk in model.encoder.layers:
        mha = blk.self_attention
        y = blk.ln_1(t)
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        q, k, v = (_heads(y @ w.T + bias, mha.num_heads) for w, bias in
                   ((wq, bq), (wk, bk), (wv, bv)))  # fmt: skip
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        attns.append(a)
        o = (a @ v).transpose(1, 2).reshape(t.shape)
        t = t + o @ mha.out_proj.weight.T + mha.out_proj.bias
        t = t + blk.mlp(blk.ln_2(t))
    return model.heads(model.encoder.ln(t)[:, 0]), attns


def timm_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    t = t.detach().requires_grad_(True)
    attns = []
    for blk in model.blocks:
        at = blk.attn
        y = blk.norm1(t)
        b, n, c = y.shape
        q, k, v = at.qkv(y).reshape(b, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
        q, k = at.q_norm(q), at.k_norm(k)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(at.head_dim), dim=-1)
        attns.append(a)
        t = t + blk.ls1(at.proj(at.norm((a @ v).transpose(1, 2).reshape(b, n, c))))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t)), attns


def reference_forward(kind: str, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    with torch.enable_grad():
        logits, attns = (tv_forward if kind == "torchvision" else timm_forward)(model, x)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-5)  # the written-out forward is right
    return logits, attns


# --------------------------------------------------------------------------------------------
# The papers' formulas
# --------------------------------------------------------------------------------------------


def fused(a: Tensor, how: str) -> Tensor:  # [H, N, N] -> [N, N]
    return {"mean": a.mean(0), "max": a.max(0).values, "min": a.min(0).values}[how]


def vit_explain_discard(m: Tensor, ratio: float) -> Tensor:
    """vit-explain's drop, for one image: the int(N*N*ratio) lowest entries set to zero,
    except flat index 0."""
    flat = m.flatten().clone()
    _, low = flat.topk(int(flat.numel() * ratio), largest=False)
    low = low[low != 0]
    flat[low] = 0
    return flat.view(m.shape)


def reference_rollout(attns: list[Tensor], prefix: int, how: str, ratio: float) -> Tensor:
    rows = []
    for b in range(attns[0].shape[0]):
        n = attns[0].shape[-1]
        result = torch.eye(n, dtype=torch.float64)
        for a in attns:
            m = vit_explain_discard(fused(a[b].double(), how), ratio)
            m = (m + torch.eye(n, dtype=torch.float64)) / 2
            m = m / m.sum(dim=-1, keepdim=True)
            result = m @ result
        rows.append(result[0, prefix:])
    return torch.stack(rows)


def residual(a: Tensor, how: str) -> Tensor:  # one image: [H, N, N] -> [N, N] float64
    m = fused(a.double(), how) + torch.eye(a.shape[-1], dtype=torch.float64)
    return m / m.sum(dim=-1, keepdim=True)


def networkx_flows(attns: list[Tensor], prefix: int, how: str) -> Tensor:
    """Max flow from each input patch (layer 0) up to the class token of the last layer."""
    rows = []
    layers, n = len(attns), attns[0].shape[-1]
    for b in range(attns[0].shape[0]):
        g = nx.DiGraph()
        for layer, a in enumerate(attns):
            m = residual(a[b], how)
            for j in range(n):
                for i in range(n):
                    g.add_edge((layer, i), (layer + 1, j), capacity=float(m[j, i]))
        rows.append([nx.maximum_flow_value(g, (0, p), (layers, 0)) for p in range(prefix, n)])
    return torch.tensor(rows, dtype=torch.float64)


def reference_gradcam(logits: Tensor, attns: list[Tensor], targets: Tensor, prefix: int) -> Tensor:
    score = logits.gather(1, targets[:, None]).sum()
    grads = torch.autograd.grad(score, attns, retain_graph=True)
    rows = []
    for b in range(logits.shape[0]):
        n = attns[0].shape[-1]
        r = torch.eye(n, dtype=torch.float64)
        for a, g in zip(attns, grads, strict=True):
            cam = (g[b] * a[b]).clamp(min=0).mean(dim=0).double()
            r = r + cam @ r
        rows.append(r[0, prefix:])
    return torch.stack(rows)


def to_map(row: Tensor, size: tuple[int, int] = (32, 32)) -> Tensor:
    b, p = row.shape
    side = math.isqrt(p)
    grid = row.float().reshape(b, 1, side, side)
    return cam_fuse_reference(grid, torch.ones(b, 1), size)


# --------------------------------------------------------------------------------------------
# Equal to the references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize(
    ("how", "ratio"), [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.5), ("max", 0.9)]
)
def test_rollout_equals_the_papers_formula(kind: str, how: str, ratio: float) -> None:
    model, x = MODELS[kind](), images()
    logits, attns = reference_forward(kind, model, x)
    expected = to_map(reference_rollout(attns, PREFIX[kind], how, ratio))
    exp = xai_serve.explain(model, x, "attention_rollout", head_fusion=how, discard_ratio=ratio)
    assert exp.maps.shape == (3, 32, 32)
    torch.testing.assert_close(exp.maps, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(exp.logits, logits.detach(), atol=1e-5, rtol=0)
    assert torch.equal(exp.targets, logits.argmax(1))


def test_rollout_row_and_residual_on_given_matrices() -> None:
    """The public maths on random attentions: the vector chain equals the matrix chain."""
    gen = torch.Generator().manual_seed(5)
    a = torch.softmax(torch.randn(4, 2, 3, 9, 9, generator=gen) * 3, dim=-1)  # [L, B, H, N, N]
    for how in attention.HEAD_FUSIONS:
        mats = attention.residual_attention(attention.fuse_heads(a, how), 0.3)
        row = attention.rollout_row(list(mats.unbind(0)))
        ref = reference_rollout(list(a.unbind(0)), 0, how, 0.3)
        torch.testing.assert_close(row.double(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["torchvision", "deit_distilled"])
@pytest.mark.parametrize("how", ["mean", "max"])
def test_attention_flow_equals_networkx(kind: str, how: str) -> None:
    model, x = MODELS[kind](), images(2)
    _, attns = reference_forward(kind, model, x)
    attns = [a.detach() for a in attns]
    flows = networkx_flows(attns, PREFIX[kind], how)
    # The flow values themselves (capacities rounded to multiples of 2**-26: each cut of k
    # edges is off by at most k * 2**-27; here N = 17 or 18 in-edges of a patch).
    mats = torch.stack([torch.stack([residual(a[b], how) for b in range(2)]) for a in attns])
    ours = attention.flow_values(mats, PREFIX[kind])
    assert (ours - flows).abs().max() <= 18 * 2**-27
    exp = xai_serve.explain(model, x, "attention_flow", head_fusion=how)
    torch.testing.assert_close(exp.maps, to_map(flows), atol=TOL, rtol=0)


def test_attention_flow_rounding_error_is_within_its_bound() -> None:
    """Peaked random attentions (3 layers, 7 tokens, float64): the max flow of the capacities
    rounded to multiples of 2**-26 stays within n * 2**-27 of networkx's max flow of the
    float capacities (n in-edges of a patch: a cut that bounds the error of the minimum)."""
    gen = torch.Generator().manual_seed(6)
    layers, n = 3, 7
    a = torch.softmax(torch.randn(layers, 1, n, n, generator=gen, dtype=torch.float64) * 4, -1)
    mats = 0.5 * a + 0.5 * torch.eye(n, dtype=torch.float64)
    ours = attention.flow_values(mats, 1)
    ref = networkx_flows([m[:, None] * 2 - torch.eye(n) for m in mats], 1, "mean")
    # (the residual() of 2m - I is m again: rows of m sum to 1)
    assert (ours - ref).abs().max() <= n * 2**-27


def test_flow_chunks_of_images_equal_single_images() -> None:
    """More images than one scipy call takes (8): every image's flows are its own, exactly
    (a maximum flow's value is unique; the integers are the same)."""
    gen = torch.Generator().manual_seed(7)
    a = torch.softmax(torch.randn(2, 11, 6, 6, generator=gen, dtype=torch.float64) * 3, -1)
    mats = attention.residual_attention(a)
    whole = attention.flow_values(mats, 1)
    for b in range(11):
        assert torch.equal(whole[b : b + 1], attention.flow_values(mats[:, b : b + 1], 1))
    with pytest.raises(InvalidInput, match="capacities"):
        attention.flow_values(mats * 2, 1)


@pytest.mark.parametrize("kind", list(MODELS))
def test_attention_gradcam_equals_chefer_et_al(kind: str) -> None:
    model, x = MODELS[kind](), images()
    logits, attns = reference_forward(kind, model, x)
    for target in (None, torch.tensor([1, 4, 7])):
        targets = logits.argmax(1) if target is None else target
        expected = to_map(reference_gradcam(logits, attns, targets, PREFIX[kind]))
        exp = xai_serve.explain(model, x, "attention_gradcam", target=target)
        torch.testing.assert_close(exp.maps, expected, atol=TOL, rtol=0)
        assert torch.equal(exp.targets, targets)


def _with_head(model: nn.Module) -> nn.Module:
    """torchvision initialises a ViT's head to zero (all logits 0, all gradients 0)."""
    with torch.no_grad():
        w = model.heads.head.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(4)) * 0.02)
    return model


# Default-initialised ViTs attend almost uniformly: the rollout's patch row spans ~8% of its
# mean, and the min-max normalisation magnifies float32 rounding through 12-24 layers of
# N = 197 (measured up to 1.9e-5 against the float64 reference).
TOL_REAL = 1e-4


def test_real_size_torchvision_vit_b_32() -> None:
    """vit_b_32 (random weights): the forward's logits stay the model's, the grid is 7 x 7."""
    model = _with_head(torchvision.models.vit_b_32(weights=None).eval())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(x)
    for method in ("attention_rollout", "attention_gradcam"):
        exp = xai_serve.explain(model, x, method, size=(7, 7))
        torch.testing.assert_close(exp.logits, plain, atol=1e-4, rtol=1e-4)
        # cam_fuse normalises by multiplying with 1 / (max - min): the max lands on 1.0 to
        # float32 rounding (0.99999994 for some unseeded random weights)
        assert exp.maps.shape == (1, 7, 7)
        assert abs(float(exp.maps.max()) - 1.0) <= 2e-7


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_b_16", "vit_l_16"])
def test_real_size_torchvision_vits(arch: str) -> None:
    model = _with_head(getattr(torchvision.models, arch)(weights=None).eval())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    _, attns = reference_forward("torchvision", model, x)
    exp = xai_serve.explain(model, x, "attention_rollout", size=(14, 14))
    rows = reference_rollout([a.detach() for a in attns], 1, "mean", 0.0)
    torch.testing.assert_close(exp.maps, to_map(rows, (14, 14)), atol=TOL_REAL, rtol=0)


# --------------------------------------------------------------------------------------------
# Batches, outputs, and the model left as it was
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["torchvision", "timm_reg4"])
def test_batch_equals_per_image(method: str, kind: str) -> None:
    model, x = MODELS[kind](), images(4)
    target = torch.tensor([0, 3, 5, 9])
    whole = xai_serve.explain(model, x, method, target=target)
    for i in range(4):
        one = xai_serve.explain(model, x[i : i + 1], method, target=target[i : i + 1])
        torch.testing.assert_close(whole.maps[i : i + 1], one.maps, atol=TOL, rtol=0)
    chunked = xai_serve.explain(model, x, method, target=target, batch_size=3)
    torch.testing.assert_close(chunked.maps, whole.maps, atol=TOL, rtol=0)


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "dicts": [sorted(m.__dict__) for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "fused": [getattr(m, "fused_attn", None) for m in model.modules()],
        "training": [m.training for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict[str, object], x: Tensor, out: Tensor) -> None:
    after = _state(model)
    for key in ("requires_grad", "dicts", "hooks", "fused", "training"):
        assert after[key] == before[key], key
    for k, v in before["params"].items():  # type: ignore[attr-defined]
        assert torch.equal(after["params"][k], v), k  # type: ignore[index]
    with torch.no_grad():
        assert torch.equal(model(x), out)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_outputs_equal_the_untouched_model_and_model_is_unchanged(method: str, kind: str) -> None:
    model, x = MODELS[kind](), images()
    with torch.no_grad():
        out = model(x)
    before = _state(model)
    exp = xai_serve.explain(model, x, method)
    torch.testing.assert_close(exp.logits, out, atol=1e-5, rtol=0)
    _assert_unchanged(model, before, x, out)
    # also after errors: one after the forward (a target out of range), one inside it
    with pytest.raises(InvalidInput, match="target"):
        xai_serve.explain(model, x, method, target=torch.tensor([0, 1, 5000]))
    _assert_unchanged(model, before, x, out)
    last = model.encoder.layers[-1] if kind == "torchvision" else model.blocks[-1]

    def boom(*_: object) -> None:
        raise RuntimeError("boom inside the forward")

    handle = last.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            xai_serve.explain(model, x, method)
    finally:
        handle.remove()
    _assert_unchanged(model, before, x, out)


def test_gradcam_computes_no_parameter_gradients() -> None:
    model = tv_vit()
    for p in model.parameters():
        p.requires_grad_(True)  # a model as built, not prepared for serving
    x = images()
    logits, attns = reference_forward("torchvision", model, x)
    expected = to_map(reference_gradcam(logits, attns, logits.argmax(1), 1))
    exp = xai_serve.explain(model, x, "attention_gradcam")
    torch.testing.assert_close(exp.maps, expected, atol=TOL, rtol=0)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_inference_mode_and_no_grad() -> None:
    model, x = tv_vit(), images()
    ref = xai_serve.explain(model, x, "attention_rollout")
    with torch.inference_mode():
        got = xai_serve.explain(model, x, "attention_rollout")
    torch.testing.assert_close(got.maps, ref.maps, atol=0, rtol=0)
    with torch.inference_mode(), pytest.raises(InvalidInput, match="inference_mode"):
        xai_serve.explain(model, x, "attention_gradcam")
    ref = xai_serve.explain(model, x, "attention_gradcam")
    with torch.no_grad():
        got = xai_serve.explain(model, x, "attention_gradcam")
    torch.testing.assert_close(got.maps, ref.maps, atol=0, rtol=0)


def test_wrapped_vit_is_found() -> None:
    model = tv_vit()
    wrapped = nn.Sequential(nn.Identity(), model).eval()
    x = images()
    a = xai_serve.explain(model, x, "attention_rollout")
    b = xai_serve.explain(wrapped, x, "attention_rollout")
    torch.testing.assert_close(a.maps, b.maps, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class WindowAttention(nn.Module):  # named as Swin's
    def forward(self, x: Tensor) -> Tensor:
        return x


class SwinLike(TinyCNN):
    def __init__(self) -> None:
        super().__init__()
        self.attn = WindowAttention()


class WithMHA(TinyCNN):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)


def tiny_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[1], window_size=[2, 2],
        num_classes=10,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (TinyCNN, "no attention layers"),
        (SwinLike, "windowed attention"),
        (tiny_swin, "windowed attention .*SwinTransformer"),
        (WithMHA, r"attention \(MultiheadAttention\) is not supported"),
    ],
)
def test_unsupported_models_are_refused(
    method: str, build: Callable[[], nn.Module], match: str
) -> None:
    with pytest.raises(InvalidInput, match=match):
        xai_serve.explain(build().eval(), images(), method)


def test_timm_without_class_token_is_refused() -> None:
    model = TimmViT(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, class_token=False,
        global_pool="avg", num_classes=10,
    ).eval()  # fmt: skip
    with pytest.raises(InvalidInput, match="class token"):
        xai_serve.explain(model, images(), "attention_rollout")


def test_wrong_image_size_is_refused() -> None:
    for model in (tv_vit(), timm_vit()):
        with pytest.raises(InvalidInput, match="32 x 32"):
            xai_serve.explain(model, torch.randn(1, 3, 40, 40), "attention_rollout")


@pytest.mark.parametrize("method", ["attention_rollout", "attention_flow"])
@pytest.mark.parametrize("bad", ["avg", "MEAN", "", 1, None])
def test_bad_head_fusion(method: str, bad: object) -> None:
    with pytest.raises(InvalidInput, match=r"head_fusion.*mean, max, min"):
        xai_serve.explain(tv_vit(), images(), method, head_fusion=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_bad_discard_ratio(bad: object) -> None:
    with pytest.raises(InvalidInput, match=r"discard_ratio.*\[0, 1\)"):
        xai_serve.explain(tv_vit(), images(), "attention_rollout", discard_ratio=bad)


def test_options_a_method_does_not_take() -> None:
    with pytest.raises(InvalidInput, match="discard_ratio"):
        xai_serve.explain(tv_vit(), images(), "attention_flow", discard_ratio=0.1)
    with pytest.raises(InvalidInput, match="head_fusion"):
        xai_serve.explain(tv_vit(), images(), "attention_gradcam", head_fusion="max")


def test_flow_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = tv_vit(), images(1)  # 17 tokens x 2 layers = 34
    with pytest.raises(InvalidInput, match=r"34 is over the limit of 33 .*flow_limit"):
        xai_serve.explain(model, x, "attention_flow", flow_limit=33)
    xai_serve.explain(model, x, "attention_flow", flow_limit=34)
    monkeypatch.setattr(attention, "FLOW_LIMIT", 20)
    with pytest.raises(InvalidInput, match="over the limit of 20"):
        xai_serve.explain(model, x, "attention_flow")
    for bad in (0, -3, 2.5, "10"):
        with pytest.raises(InvalidInput, match="flow_limit"):
            xai_serve.explain(model, x, "attention_flow", flow_limit=bad)


def test_default_limit_takes_vit_b_at_224_and_refuses_vit_l() -> None:
    """The default limit in the terms of real models: ViT-S/B/16 at 224 (197 x 12) pass,
    ViT-L/16 (197 x 24) is refused before any forward."""
    assert 197 * 12 <= attention.FLOW_LIMIT < 197 * 24


def test_traits() -> None:
    for name in METHODS:
        cls = get_method(name)
        assert name in xai_serve.list_methods()
        assert not cls.uses_layer and not cls.randomised and not cls.takes_baseline
        assert not cls.produces_segments and not cls.pixel_level
        assert cls.needs_gradients == (name == "attention_gradcam")
