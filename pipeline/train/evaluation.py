"""Accuracy of a distilled student's heads (class, distillation, fused) and of a plain classifier."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from timm.utils import accuracy

from pipeline.train.models import student_heads


def topk_accuracy(logits: torch.Tensor, label: torch.Tensor, k: int) -> float:
    """Top-k accuracy as a fraction (timm's ``accuracy``, which gives percent; k is clamped to the classes)."""
    return float(accuracy(logits, label, topk=(k,))[0]) / 100


@torch.no_grad()
def collect_logits_many(
    models: Sequence[torch.nn.Module], batches: Iterable, device: torch.device, heads: bool = False
) -> list[dict[str, torch.Tensor]]:
    """:func:`collect_logits` of several models in one pass over ``batches`` (each batch read once)."""
    modes = [m.training for m in models]
    outs: list[dict[str, list[torch.Tensor]]] = [{"index": [], "label": []} for _ in models]
    try:
        for m in models:
            m.eval()
        for batch in batches:
            x = batch.view.to(device)
            for model, out in zip(models, outs, strict=True):
                out["index"].append(batch.index)
                out["label"].append(batch.label)
                if heads:
                    cls, dist = student_heads(model, x)
                    out.setdefault("cls", []).append(cls.float().cpu())
                    out.setdefault("dist", []).append(dist.float().cpu())
                else:
                    out.setdefault("logits", []).append(model(x).float().cpu())
    finally:
        for m, was_training in zip(models, modes, strict=True):
            m.train(was_training)
    results = []
    for out in outs:
        res = {k: torch.cat(v) for k, v in out.items()}
        if heads:
            res["fused"] = (res["cls"] + res["dist"]) / 2
        results.append(res)
    return results


def collect_logits(model: torch.nn.Module, batches: Iterable, device: torch.device, heads: bool = False) -> dict:
    """Index, label and logits of every sample in one pass: ``logits`` of a plain model, or ``cls`` and
    ``dist`` (and their average, timm's fused output, as ``fused``) of a distilled student."""
    return collect_logits_many([model], batches, device, heads)[0]


def head_accuracies(out: dict) -> dict[str, float]:
    """Top-1/top-5 of the class head, the distillation head and their average, from ``collect_logits``."""
    return {f"{h}_top{k}": topk_accuracy(out[h], out["label"], k) for h in ("cls", "dist", "fused") for k in (1, 5)}


@torch.no_grad()
def throughput(model: torch.nn.Module, example: torch.Tensor, device: torch.device, seconds: float) -> float:
    """Inference images/s on one repeated batch (after warm-up), as in the paper's Table 5."""
    model.eval()
    x = example.to(device)
    for _ in range(2):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model(x)
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)
