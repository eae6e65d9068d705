"""DeiT distillation losses, and the teacher targets they consume.

The loss follows the official DeiT code (facebookresearch/deit ``losses.py``, ``DistillationLoss``):

- the *base* term is soft-target cross-entropy of the class head against the mixed target (the target
  already carries the Mixup/CutMix λ and label smoothing);
- ``soft``: ``KL(teacher_τ ‖ student_τ) · τ² / numel``, where ``numel`` is batch × classes (the
  official normalisation, *not* the batch size), total ``(1 - α)·base + α·distill``;
- ``hard``: cross-entropy of the student to the teacher's argmax, total ``(1 - α)·base + α·distill``
  (α = 0.5 is the paper's ½/½);
- ``none``: a plain DeiT, total = base on the class head; the teacher is ignored.

``token`` picks which head takes the teacher term: ``dist`` (DeiT⚗, the distillation head) or
``class`` (the paper's "no token" rows of Table 3: both terms on the class head, dist head unused).

Teacher targets come either from a live teacher (:func:`teacher_targets_from_logits`) or from the
offline logit store's top-k (:func:`teacher_targets_from_store`), both giving :class:`TeacherTargets`
so the loss cannot tell them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("none", "soft", "hard")
TOKENS = ("dist", "class")

Outputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TeacherTargets:
    """What the student needs from the teacher for one batch.

    ``log_probs`` is only built for soft distillation (it is B × C floats); ``tau`` records the
    temperature it was built at, so the loss can refuse targets made for another temperature.
    """

    hard_label: torch.Tensor
    """(B,) int64: argmax of the teacher's logits."""
    log_probs: torch.Tensor | None
    """(B, C) float32 teacher log-probabilities at temperature ``tau``; None when not needed."""
    tau: float | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        """The same targets on ``device``."""
        lp = None if self.log_probs is None else self.log_probs.to(device, non_blocking=non_blocking)
        return replace(self, hard_label=self.hard_label.to(device, non_blocking=non_blocking), log_probs=lp)


@dataclass
class LossParts:
    """The total loss and its two terms (``distill`` is a zero tensor for ``none``), for logging."""

    total: torch.Tensor
    base: torch.Tensor
    distill: torch.Tensor


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def teacher_targets_from_logits(logits: torch.Tensor, tau: float, need_soft: bool) -> TeacherTargets:
    """Targets from a live teacher's full logits (the online path): argmax and log_softmax(logits / τ).

    Detached and in float32, so the teacher never receives gradient and fp16 autocast logits do not
    lose precision in the soft term.
    """
    _check_tau(tau)
    if logits.ndim != 2:
        raise ValueError(f"teacher logits must be (B, C), got shape {tuple(logits.shape)}")
    logits = logits.detach().float()
    hard = logits.argmax(dim=1)
    log_probs = F.log_softmax(logits / tau, dim=1) if need_soft else None
    return TeacherTargets(hard_label=hard, log_probs=log_probs, tau=float(tau) if need_soft else None)


def _as_tensor(x: Any, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """numpy (including uint16, which torch handles poorly) or torch → torch tensor of ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    np_dtype = np.int64 if dtype == torch.int64 else np.float32
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np_dtype))).to(device)


def dense_log_probs_from_topk(
    topk_logits: torch.Tensor,
    topk_classes: torch.Tensor,
    logsumexp: torch.Tensor,
    num_classes: int,
    tau: float,
) -> torch.Tensor:
    """Rebuild (B, C) teacher log-probabilities at temperature τ from stored top-k logits.

    k == C: the full logit vector is known (up to its fp16 rounding), so this is exactly
    ``log_softmax(logits / τ)``. k < C: the tail mass ``1 - Σ exp(topk - lse)`` (at τ = 1) is spread
    evenly over the unstored classes, each getting logit ``lse + log(tail / (C - k))``; the result is
    then ``log_softmax(full / τ)`` over all C. At τ = 1 this keeps the stored classes' probabilities
    exact and the tail mass right; it is the torch twin of the store package's numpy version.
    """
    _check_tau(tau)
    if topk_logits.ndim != 2 or topk_classes.shape != topk_logits.shape:
        raise ValueError(
            f"topk_logits and topk_classes must both be (B, k), got {tuple(topk_logits.shape)} "
            f"and {tuple(topk_classes.shape)}"
        )
    b, k = topk_logits.shape
    if logsumexp.shape != (b,):
        raise ValueError(f"logsumexp must be (B,) = ({b},), got {tuple(logsumexp.shape)}")
    if k > num_classes:
        raise ValueError(f"the store holds k={k} logits per sample but num_classes is {num_classes}")
    if b and (int(topk_classes.min()) < 0 or int(topk_classes.max()) >= num_classes):
        raise ValueError(
            f"topk_classes out of range [0, {num_classes}): min {int(topk_classes.min())}, "
            f"max {int(topk_classes.max())}"
        )
    stored = torch.zeros(b, num_classes, dtype=torch.bool, device=topk_logits.device)
    stored.scatter_(1, topk_classes, True)
    if b and not bool((stored.sum(dim=1) == k).all()):
        raise ValueError("topk_classes repeats a class within a sample; the stored top-k is corrupt")

    if k == num_classes:
        full = torch.empty(b, num_classes, dtype=torch.float32, device=topk_logits.device)
    else:
        # Tail mass at τ = 1; fp16 rounding can push the stored mass a hair above 1, hence the floor.
        stored_mass = torch.exp(topk_logits - logsumexp[:, None]).sum(dim=1)
        tail = (1.0 - stored_mass).clamp_min(1e-12)
        tail_logit = logsumexp + torch.log(tail / (num_classes - k))
        full = tail_logit[:, None].expand(b, num_classes).clone()
    full.scatter_(1, topk_classes, topk_logits)
    return F.log_softmax(full / tau, dim=1)


def teacher_targets_from_store(
    topk_logits: torch.Tensor | np.ndarray | None,
    topk_classes: torch.Tensor | np.ndarray | None,
    logsumexp: torch.Tensor | np.ndarray | None,
    hard_label: torch.Tensor | np.ndarray | None,
    num_classes: int,
    tau: float,
    need_soft: bool,
    *,
    device: torch.device | str | None = None,
) -> TeacherTargets:
    """Targets from the offline logit store (numpy arrays as read from Zarr, or tensors).

    Hard distillation needs only ``hard_label`` (argmax of the full fp32 logits, as stored); when it is
    None it is taken as the top-1 stored class. Soft distillation rebuilds dense log-probabilities with
    :func:`dense_log_probs_from_topk`.
    """
    _check_tau(tau)
    if hard_label is None:
        if topk_logits is None or topk_classes is None:
            raise ValueError("hard_label is None and there are no top-k arrays to derive it from")
        logits_t = _as_tensor(topk_logits, torch.float32, device)
        classes_t = _as_tensor(topk_classes, torch.int64, device)
        hard = classes_t.gather(1, logits_t.argmax(dim=1, keepdim=True)).squeeze(1)
    else:
        hard = _as_tensor(hard_label, torch.int64, device)
    if hard.ndim != 1:
        raise ValueError(f"hard_label must be (B,), got shape {tuple(hard.shape)}")
    if hard.numel() and (int(hard.min()) < 0 or int(hard.max()) >= num_classes):
        raise ValueError(
            f"hard_label out of range [0, {num_classes}): {int(hard.min())}..{int(hard.max())}"
        )
    if not need_soft:
        return TeacherTargets(hard_label=hard, log_probs=None)
    if topk_logits is None or topk_classes is None or logsumexp is None:
        raise ValueError("soft distillation needs topk_logits, topk_classes and logsumexp from the store")
    log_probs = dense_log_probs_from_topk(
        _as_tensor(topk_logits, torch.float32, device),
        _as_tensor(topk_classes, torch.int64, device),
        _as_tensor(logsumexp, torch.float32, device),
        num_classes,
        tau,
    )
    if log_probs.shape[0] != hard.shape[0]:
        raise ValueError(
            f"hard_label has {hard.shape[0]} rows but the top-k arrays have {log_probs.shape[0]}"
        )
    return TeacherTargets(hard_label=hard, log_probs=log_probs, tau=float(tau))


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy (mean over the batch of −Σ target · log_softmax), in float32."""
    return torch.sum(-target.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _split_outputs(outputs: Outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(outputs, torch.Tensor):
        return outputs, None
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2:
        cls_logits, dist_logits = outputs
        if not (isinstance(cls_logits, torch.Tensor) and isinstance(dist_logits, torch.Tensor)):
            raise ValueError("outputs must be a tensor or a (class_logits, dist_logits) pair of tensors")
        if cls_logits.shape != dist_logits.shape:
            raise ValueError(
                "class and dist logits differ in shape: "
                f"{tuple(cls_logits.shape)} vs {tuple(dist_logits.shape)}"
            )
        return cls_logits, dist_logits
    raise ValueError(
        f"outputs must be a tensor or a (class_logits, dist_logits) pair, got {type(outputs).__name__}"
        + (f" of length {len(outputs)}" if isinstance(outputs, (tuple, list)) else "")
    )


def _check_loss_args(kind: str, token: str, alpha: float, tau: float, teacher_smoothing: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown distillation kind {kind!r}; expected one of {', '.join(KINDS)}")
    if token not in TOKENS:
        raise ValueError(f"unknown distillation token {token!r}; expected one of {', '.join(TOKENS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    _check_tau(tau)
    if not 0.0 <= teacher_smoothing < 1.0:
        raise ValueError(f"teacher_smoothing must be in [0, 1), got {teacher_smoothing!r}")


def _as_soft_target(mixed_target: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """(B, C) soft targets as given, or (B,) int labels one-hot encoded (no smoothing)."""
    if mixed_target.ndim == 1 and not mixed_target.is_floating_point():
        mixed_target = F.one_hot(mixed_target.long(), c).float()
    if mixed_target.shape != (b, c):
        raise ValueError(
            f"mixed_target must be (B, C) = ({b}, {c}) like the student logits, got {tuple(mixed_target.shape)}"
        )
    return mixed_target


def _hard_term(student: torch.Tensor, teacher: TeacherTargets, smoothing: float) -> torch.Tensor:
    """Cross-entropy of the student to the teacher's argmax (optionally label-smoothed)."""
    b = student.shape[0]
    if teacher.hard_label.shape != (b,):
        raise ValueError(
            f"teacher hard_label must be ({b},) like the student batch, got {tuple(teacher.hard_label.shape)}"
        )
    return F.cross_entropy(student.float(), teacher.hard_label.long(), label_smoothing=smoothing)


def _soft_term(student: torch.Tensor, teacher: TeacherTargets, tau: float) -> torch.Tensor:
    """KL(teacher_τ ‖ student_τ) · τ² / (batch × classes), as the official DeiT code normalises it."""
    b, c = student.shape
    if teacher.log_probs is None:
        raise ValueError("soft distillation needs teacher log-probabilities (build targets with need_soft=True)")
    if teacher.tau is not None and not math.isclose(teacher.tau, tau, rel_tol=1e-6):
        raise ValueError(f"teacher targets were built at tau={teacher.tau} but the loss uses tau={tau}")
    if teacher.log_probs.shape != (b, c):
        raise ValueError(
            f"teacher log_probs must be ({b}, {c}) like the student logits, got {tuple(teacher.log_probs.shape)}"
        )
    s = student.float()
    kl = F.kl_div(F.log_softmax(s / tau, dim=1), teacher.log_probs.float(), reduction="sum", log_target=True)
    return kl * (tau * tau) / s.numel()


def distillation_loss(
    outputs: Outputs,
    mixed_target: torch.Tensor,
    teacher: TeacherTargets | None,
    *,
    kind: str,
    alpha: float,
    tau: float,
    token: str,
    teacher_smoothing: float = 0.0,
) -> LossParts:
    """The DeiT training loss for one batch (see the module docstring for the formulas).

    ``outputs`` is ``(class_logits, dist_logits)`` from a distilled student in distilled-training mode,
    or a single (B, C) tensor (a plain model, or an eval-mode fused output). ``token='dist'`` with a
    teacher term needs the pair. ``mixed_target`` is the (B, C) soft target (Mixup/CutMix λ and label
    smoothing already in); (B,) int labels are accepted and one-hot encoded without smoothing.

    The soft term is divided by batch × classes as in the official DeiT code, not by the batch size, so
    its scale is 1/C of a per-sample KL (see :func:`_soft_term`).

    When the dist head is in ``outputs`` but unused (``none``, or ``token='class'``) it joins the graph
    with weight exactly 0, so DistributedDataParallel sees a (zero) gradient for every parameter and
    needs no ``find_unused_parameters``.
    """
    _check_loss_args(kind, token, alpha, tau, teacher_smoothing)

    cls_logits, dist_logits = _split_outputs(outputs)
    if cls_logits.ndim != 2:
        raise ValueError(f"student logits must be (B, C), got shape {tuple(cls_logits.shape)}")
    b, c = cls_logits.shape

    base = soft_target_cross_entropy(cls_logits, _as_soft_target(mixed_target, b, c))
    # Weight-0 link to an unused dist head: keeps DDP's every-parameter-gets-a-gradient invariant.
    unused = dist_logits.float().sum() * 0.0 if dist_logits is not None else None

    if kind == "none":
        distill = base.new_zeros(())
        total = base if unused is None else base + unused
        return LossParts(total=total, base=base, distill=distill)

    if teacher is None:
        raise ValueError(f"distillation kind {kind!r} needs teacher targets, got teacher=None")
    if token == "dist":
        if dist_logits is None:
            raise ValueError(
                f"token='dist' with kind {kind!r} needs (class_logits, dist_logits); got a single tensor "
                "(call model.set_distilled_training(True) and keep the model in train mode)"
            )
        student = dist_logits
        unused = None
    else:
        student = cls_logits

    distill = _soft_term(student, teacher, tau) if kind == "soft" else _hard_term(student, teacher, teacher_smoothing)

    total = (1.0 - alpha) * base + alpha * distill
    if unused is not None:
        total = total + unused
    return LossParts(total=total, base=base, distill=distill)
