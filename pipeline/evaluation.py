"""Accuracy of a distilled student's heads (class, distillation, fused) and of a plain classifier."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from pipeline.models import student_heads


def _topk_correct(logits: torch.Tensor, label: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == label[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate_student(model: torch.nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 of the class head, the distillation head and their average (timm's fused output)."""
    was_training = model.training
    model.eval()
    counts = {f"{h}_top{k}": 0 for h in ("cls", "dist", "fused") for k in (1, 5)}
    n = 0
    for batch in batches:
        x, y = batch.view.to(device), batch.label.to(device)
        cls, dist = student_heads(model, x)
        for name, logits in (("cls", cls), ("dist", dist), ("fused", (cls + dist) / 2)):
            counts[f"{name}_top1"] += _topk_correct(logits, y, 1)
            counts[f"{name}_top5"] += _topk_correct(logits, y, 5)
        n += len(y)
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in counts.items()}


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable, device: torch.device, head: str | None = None) -> dict:
    """Labels and logits for every batch (for disagreement tables).

    ``head`` picks a distilled student's ``cls``, ``dist`` or ``fused`` output; None for a plain model.
    """
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"index": [], "label": [], "logits": []}
    for batch in batches:
        x = batch.view.to(device)
        if head is None:
            logits = model(x)
        else:
            cls, dist = student_heads(model, x)
            logits = {"cls": cls, "dist": dist, "fused": (cls + dist) / 2}[head]
        out["index"].append(batch.index)
        out["label"].append(batch.label)
        out["logits"].append(logits.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def throughput(model: torch.nn.Module, example: torch.Tensor, device: torch.device, seconds: float = 3.0) -> float:
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
