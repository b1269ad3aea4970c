"""Attention explanations of a ViT: ours vs a vit-explain-style loop vs the limit, one run.

``python -m benchmarks.bench_attention [--quick] [--device cuda]`` writes
``benchmarks/results/<date>-<device>-attention.{json,md}``.

Model: a ViT-S/16 (torchvision ``VisionTransformer(image_size=224, patch_size=16,
num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)``, seeded random weights, its head
included: speed does not depend on the weights' values), eval, parameters without grad as the
server prepares them; a batch of 8 seeded random images. ``--quick``: the same layout at
64 x 64 with 4 layers, batch 2, one round (only to check that the script runs).

Rows, each timed in interleaved rounds (A, B, C, C, B, A, ...; medians), ratios in one run:

- ``ours, tuned``: ``attention_rollout`` (``head_fusion="mean"``, ``discard_ratio=0.9``) and
  ``attention_gradcam`` through :func:`xai_serve.explain`, the whole batch, on the forward path
  that :func:`xai_serve.tune` chose for the model (``compile="off"``; what a served model runs;
  the attention methods compute in fp32 whatever precision the path has, on its oneDNN twin
  when it has one) -- the path is named in the results;
- ``ours, untuned``: the same calls on the model's default path (ATen's linear layers);
- ``vit-explain loop``: what jacobgil/vit-explain's users run, written here: each block's
  ``nn.MultiheadAttention`` wrapped to return its per-head weights (``need_weights=True``,
  ``average_attn_weights=False``) and a forward hook collecting them (and, for the gradient
  variant, a tensor hook collecting their gradients), one image at a time, the rollout as
  ``N x N`` matrix products on the CPU, the mask to NumPy, divided by its max and resized
  with PIL; the gradient variant calls ``loss.backward()`` on a copy of the model whose
  parameters require grad (as a model built by its users does), with Chefer et al.'s rule
  (the one ``attention_gradcam`` computes) in the loop;
- ``limit``: the best exact (fp32) forward: one no-grad forward of the batch (rollout: any
  attention method reads the attentions during a forward of the batch); one forward +
  backward of the summed target logits to the input (attention_gradcam); each on the model
  (ATen's linear layers) and on the tuned path's twin when it has one ("vs limit" is to the
  faster of the two).
- ``rollout maths``: ``residual_attention`` + ``rollout_row`` + ``cam_fuse`` on attentions
  captured before (what a fused rollout-and-upsample kernel could speed up).

Attention flow's cost per image: ``attention_flow`` on 2 images of the same ViT-S/16 at
112 x 112 (50 tokens x 12 layers) and, without ``--quick``, at 224 x 224 (197 x 12), split into
the forward and the maximum-flow solves.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

import xai_serve
from benchmarks.timing import interleaved_medians, sync, write_results
from xai_serve import ops
from xai_serve.explainers import attention

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- setup


def vit_s16(image_size: int, layers: int, device: torch.device) -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=image_size,
        patch_size=16,
        num_layers=layers,
        num_heads=6,
        hidden_dim=384,
        mlp_dim=1536,
    )
    with torch.no_grad():  # torchvision initialises the head to zero: no gradients at all
        model.heads.head.weight.normal_(0, 0.02)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- the peer loop


class _VitExplainHooks:
    """vit-explain-style capture on a torchvision ViT, per image.

    Without gradients: each block's attention wrapped to return its per-head weights
    (``need_weights=True, average_attn_weights=False``) and a forward hook collecting them.
    With gradients: torchvision's attention returns its weights as a view that the output does
    not depend on, so no gradient ever reaches it; users then write the attention out (here:
    ``softmax(q k^T / sqrt(d)) v`` with the module's projections) and hook the softmax's
    output for its gradient, as vit-explain does on timm's ``attn_drop``.
    """

    def __init__(self, model: nn.Module, grads: bool) -> None:
        self.attentions: list[Tensor] = []
        self.gradients: list[Tensor] = []
        self.handles = []
        self.wrapped = []
        for block in model.encoder.layers:
            mha = block.self_attention
            if grads:
                mha.forward = functools.partial(self._explicit, mha)
            else:
                original = mha.forward

                def forward(*args: Any, _orig: Callable = original, **kwargs: Any) -> Any:
                    kwargs["need_weights"] = True
                    kwargs["average_attn_weights"] = False
                    return _orig(*args, **kwargs)

                mha.forward = forward
                self.handles.append(mha.register_forward_hook(self._hook))
            self.wrapped.append(mha)

    def _hook(self, _m: nn.Module, _a: Any, out: tuple[Tensor, Tensor]) -> None:
        self.attentions.append(out[1].detach().cpu())

    def _explicit(self, mha: nn.MultiheadAttention, x: Tensor, *_: Any, **__: Any) -> Any:
        b, n, d = x.shape
        h = mha.num_heads
        qkv = nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
        self.attentions.append(a.detach().cpu())
        a.register_hook(lambda g: self.gradients.insert(0, g.detach().cpu()))
        out = (a @ v).transpose(1, 2).reshape(b, n, d)
        return mha.out_proj(out), None

    def clear(self) -> None:
        self.attentions, self.gradients = [], []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.wrapped:
            del m.forward


def _mask_to_image(mask: Tensor, size: int) -> np.ndarray:
    width = int(mask.numel() ** 0.5)
    m = mask.reshape(width, width).numpy()
    m = m / np.max(m)
    return np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.BILINEAR))


def vit_explain_rollout(hooks: _VitExplainHooks, model: nn.Module, x: Tensor) -> list[np.ndarray]:
    out = []
    for i in range(x.shape[0]):
        hooks.clear()
        with torch.no_grad():
            model(x[i : i + 1])
        result = torch.eye(hooks.attentions[0].shape[-1])
        for a in hooks.attentions:
            fused = a.mean(dim=1)
            flat = fused.view(fused.shape[0], -1)
            _, idx = flat.topk(int(flat.shape[-1] * 0.9), -1, False)
            idx = idx[idx != 0]
            flat[0, idx] = 0
            eye = torch.eye(fused.shape[-1])
            m = (fused + eye) / 2
            m = m / m.sum(dim=-1, keepdim=True)
            result = m @ result
        out.append(_mask_to_image(result[0, 0, 1:], x.shape[-1]))
    return out


def vit_explain_gradcam(hooks: _VitExplainHooks, model: nn.Module, x: Tensor) -> list[np.ndarray]:
    out = []
    for i in range(x.shape[0]):
        hooks.clear()
        model.zero_grad()
        logits = model(x[i : i + 1])
        loss = logits[0, logits[0].argmax()]
        loss.backward()
        n = hooks.attentions[0].shape[-1]
        r = torch.eye(n)
        for a, g in zip(hooks.attentions, hooks.gradients, strict=True):
            cam = (g[0] * a[0]).clamp(min=0).mean(dim=0)
            r = r + cam @ r
        out.append(_mask_to_image(r[0, 1:], x.shape[-1]))
    return out


# --------------------------------------------------------------------------- the limits


def tuned_path(model: nn.Module, x: Tensor) -> xai_serve.ForwardPath:
    """What :func:`xai_serve.tune` chooses for the model (compile off, nothing cached)."""
    settings = xai_serve.TuneSettings(compile="off", max_batch=max(8, x.shape[0]))
    return xai_serve.tune(model, tuple(x.shape[1:]), settings, cache_dir=None)


def forward_limit(model: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        model(x)
    sync(x.device)


def backward_limit(model: nn.Module, x: Tensor) -> None:
    xi = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xi)
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        torch.autograd.grad(score, xi)
    sync(x.device)


# --------------------------------------------------------------------------- parts


def bench_methods(
    model: nn.Module, x: Tensor, rounds: int, path: xai_serve.ForwardPath
) -> dict[str, Any]:
    device = x.device
    untuned = xai_serve.ForwardPath()
    twin = path.runner
    peer_model = copy.deepcopy(model)
    for p in peer_model.parameters():
        p.requires_grad_(True)  # as vit-explain's users' models are

    # the captured attentions of the batch, for the maths-only row
    vit = attention.find_vit(model, x, "bench")
    with torch.no_grad():
        tap = attention._Tap(lambda a: attention.fuse_heads(a, "mean"), False, "bench")
        with attention._tapped(vit, tap):
            model(x)
        tap_values = tap.values

    def maths() -> None:
        mats = attention.residual_attention(torch.stack(tap_values), 0.9)
        row = attention.rollout_row(list(mats.unbind(0)))[:, 1:]
        g = vit.grid
        grid = row.reshape(x.shape[0], 1, *g).contiguous()
        ops.cam_fuse(grid, torch.ones(x.shape[0], 1, device=device), tuple(x.shape[2:]))
        sync(device)

    def ours(method: str, on: xai_serve.ForwardPath, **kw: Any) -> Callable[[], None]:
        def run() -> None:
            xai_serve.explain(model, x, method, path=on, **kw)
            sync(device)

        return run

    def limits(fn: Callable[[nn.Module, Tensor], None], what: str) -> dict[str, Callable]:
        out = {f"limit: {what}, ATen linear": lambda: fn(model, x)}
        if twin is not None:
            out[f"limit: {what}, {path.linear} linear"] = lambda: fn(twin, x)
        return out

    hooked_rollout = copy.deepcopy(model)
    rollout_hooks = _VitExplainHooks(hooked_rollout, grads=False)
    gradcam_hooks = _VitExplainHooks(peer_model, grads=True)
    try:
        rollout = interleaved_medians(
            {
                "ours, tuned": ours("attention_rollout", path, discard_ratio=0.9),
                "ours, untuned": ours("attention_rollout", untuned, discard_ratio=0.9),
                "vit-explain loop": lambda: vit_explain_rollout(rollout_hooks, hooked_rollout, x),
                **limits(forward_limit, "forward"),
                "rollout maths": maths,
            },
            rounds,
        )
        gradcam = interleaved_medians(
            {
                "ours, tuned": ours("attention_gradcam", path),
                "ours, untuned": ours("attention_gradcam", untuned),
                "vit-explain loop": lambda: vit_explain_gradcam(gradcam_hooks, peer_model, x),
                **limits(backward_limit, "forward + backward"),
            },
            rounds,
        )
    finally:
        rollout_hooks.remove()
        gradcam_hooks.remove()
    return {"attention_rollout": rollout, "attention_gradcam": gradcam}


def bench_flow(model: nn.Module, x: Tensor) -> dict[str, Any]:
    """Seconds per image of attention_flow, and its split into forward and max-flow solves."""
    batch = x.shape[0]
    vit = attention.find_vit(model, x, "bench")
    t = time.perf_counter()
    with torch.no_grad():
        tap = attention._Tap(lambda a: attention.fuse_heads(a, "mean"), False, "bench")
        with attention._tapped(vit, tap):
            model(x)
    sync(x.device)
    forward_s = time.perf_counter() - t
    mats = attention.residual_attention(torch.stack(tap.values))
    attention.flow_values(mats[:1], vit.prefix)  # warm-up: scipy's first call sets up
    t = time.perf_counter()
    attention.flow_values(mats, vit.prefix)
    solve_s = time.perf_counter() - t
    t = time.perf_counter()
    xai_serve.explain(model, x, "attention_flow", flow_limit=10**6)
    sync(x.device)
    total_s = time.perf_counter() - t
    tokens = mats.shape[-1]
    return {
        "image_size": int(x.shape[-1]),
        "tokens": int(tokens),
        "layers": len(vit.attentions),
        "tokens_x_layers": int(tokens * len(vit.attentions)),
        "max_flow_problems_per_image": int(tokens - vit.prefix),
        "edges_per_problem": int(tokens * tokens * (len(vit.attentions) - 1) + tokens),
        "images": int(batch),
        "explain_s_per_image": total_s / batch,
        "forward_s_per_image": forward_s / batch,
        "max_flow_s_per_image": solve_s / batch,
    }


# --------------------------------------------------------------------------- report


def _markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Attention methods, {data['date']}, {data['device']}",
        "",
        f"{data['model']}, batch {data['batch']}, {data['rounds']} interleaved rounds "
        f"(medians); torch {data['torch']}, {data['threads']} threads.",
        "",
        f"Tuned path: {data['tuned_path']}.",
        "",
        "| method | implementation | ms per batch | ms per image | vs ours | vs limit |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method, rows in data["methods"].items():
        ours = rows["ours, tuned"]
        limit = min(v for k, v in rows.items() if k.startswith("limit"))
        for name, s in rows.items():
            lines.append(
                f"| {method} | {name} | {s * 1e3:.1f} | {s * 1e3 / data['batch']:.1f} | "
                f"{s / ours:.2f} | {s / limit:.2f} |"
            )
    lines += [
        "",
        "Attention flow, per image (scipy maximum_flow on the CPU):",
        "",
        "| image | tokens x layers | problems / image | edges / problem | s / image | "
        "forward s / image | max-flow s / image |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in data["flow"]:
        lines.append(
            f"| {f['image_size']} | {f['tokens']} x {f['layers']} = {f['tokens_x_layers']} | "
            f"{f['max_flow_problems_per_image']} | {f['edges_per_problem']} | "
            f"{f['explain_s_per_image']:.3f} | {f['forward_s_per_image']:.3f} | "
            f"{f['max_flow_s_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small ViT, batch 2, 1 round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    args = parser.parse_args()
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    device = torch.device(args.device)
    from benchmarks.run import _device_label

    label, info = _device_label()
    if device.type == "cpu":
        label = "cpu"  # on a GPU machine, --device cpu is still the CPU
    size, layers, batch = (64, 4, 2) if args.quick else (224, 12, 8)
    rounds = 1 if args.quick else args.rounds
    model = vit_s16(size, layers, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    data: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": info.get("name", label) if device.type == info.get("kind") else str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": f"torchvision ViT-S/16 ({layers} layers, {size} x {size}), random weights",
        "batch": batch,
        "rounds": rounds,
        "load_average_1min": [os.getloadavg()[0]],
    }
    path = tuned_path(model, x)
    data["tuned_path"] = path.report.summary() if path.report is not None else path.describe()
    data["methods"] = bench_methods(model, x, rounds, path)
    for method, rows in data["methods"].items():
        loop = rows["vit-explain loop"]
        data.setdefault("speedup_vs_peer", {})[method] = {
            "tuned": loop / rows["ours, tuned"],
            "untuned": loop / rows["ours, untuned"],
        }
    flows = [(112, 12)] if not args.quick else [(32, 2)]
    if not args.quick:
        flows.append((224, 12))
    data["flow"] = []
    for fsize, flayers in flows:
        fmodel = vit_s16(fsize, flayers, device)
        fx = torch.randn(2, 3, fsize, fsize, generator=gen).to(device)
        data["flow"].append(bench_flow(fmodel, fx))
    data["load_average_1min"].append(os.getloadavg()[0])
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{data['date']}-{label}-attention{'-quick' if args.quick else ''}"
    if args.out:
        stem = Path(args.out)
    write_results(stem, data, _markdown(data))
    print(_markdown(data))


if __name__ == "__main__":
    main()
