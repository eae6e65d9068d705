"""Accuracy of a distilled student's heads (class, distillation, fused) and of a plain classifier."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from pipeline.models import student_heads


def topk_accuracy(logits: torch.Tensor, label: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == label[:, None]).any(dim=1).float().mean())


@torch.no_grad()
def collect_logits(model: torch.nn.Module, batches: Iterable, device: torch.device, heads: bool = False) -> dict:
    """Index, label and logits of every sample in one pass: ``logits`` of a plain model, or ``cls`` and
    ``dist`` (and their average, timm's fused output, as ``fused``) of a distilled student."""
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"index": [], "label": []}
    for batch in batches:
        x = batch.view.to(device)
        out["index"].append(batch.index)
        out["label"].append(batch.label)
        if heads:
            cls, dist = student_heads(model, x)
            out.setdefault("cls", []).append(cls.float().cpu())
            out.setdefault("dist", []).append(dist.float().cpu())
        else:
            out.setdefault("logits", []).append(model(x).float().cpu())
    model.train(was_training)
    res = {k: torch.cat(v) for k, v in out.items()}
    if heads:
        res["fused"] = (res["cls"] + res["dist"]) / 2
    return res


def head_accuracies(out: dict) -> dict[str, float]:
    """Top-1/top-5 of the class head, the distillation head and their average, from ``collect_logits``."""
    return {f"{h}_top{k}": topk_accuracy(out[h], out["label"], k) for h in ("cls", "dist", "fused") for k in (1, 5)}


def evaluate_student(model: torch.nn.Module, batches: Iterable, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 of the class head, the distillation head and their average (timm's fused output)."""
    return head_accuracies(collect_logits(model, batches, device, heads=True))


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
