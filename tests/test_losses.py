"""The DeiT distillation losses against hand-written formulas, and the store → target reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.train.losses import (
    LossParts,
    TeacherTargets,
    dense_log_probs_from_topk,
    distillation_loss,
    teacher_targets_from_logits,
    teacher_targets_from_store,
)

B, C = 6, 5


def _inputs(seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn(B, C, generator=g)
    dist_logits = torch.randn(B, C, generator=g)
    teacher_logits = 2 * torch.randn(B, C, generator=g)
    target = torch.rand(B, C, generator=g)
    target = target / target.sum(1, keepdim=True)
    if requires_grad:
        cls_logits.requires_grad_(True)
        dist_logits.requires_grad_(True)
    return cls_logits, dist_logits, teacher_logits, target


def _manual_log_softmax(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    m = x.max(dim=1, keepdim=True).values
    return x - m - torch.log(torch.exp(x - m).sum(dim=1, keepdim=True))


def _manual_base(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (-(target.double() * _manual_log_softmax(logits)).sum(1)).mean()


def _manual_kl(student: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    log_q = _manual_log_softmax(teacher_logits / tau)
    log_p = _manual_log_softmax(student / tau)
    q = torch.exp(log_q)
    return (q * (log_q - log_p)).sum() * tau * tau / (student.shape[0] * student.shape[1])


def _manual_hard(student: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    y = teacher_logits.argmax(1)
    return -_manual_log_softmax(student)[torch.arange(student.shape[0]), y].mean()


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("token", ["dist", "class"])
def test_soft_term_matches_explicit_kl_over_numel(tau: float, token: str) -> None:
    cls_logits, dist_logits, t_logits, target = _inputs()
    teacher = teacher_targets_from_logits(t_logits, tau, need_soft=True)
    parts = distillation_loss(
        (cls_logits, dist_logits), target, teacher, kind="soft", alpha=0.3, tau=tau, token=token
    )
    student = dist_logits if token == "dist" else cls_logits
    want_kl = _manual_kl(student, t_logits, tau)
    want_base = _manual_base(cls_logits, target)
    torch.testing.assert_close(parts.distill.double(), want_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.base.double(), want_base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.total.double(), 0.7 * want_base + 0.3 * want_kl, rtol=1e-5, atol=1e-6)


def test_hard_term_is_cross_entropy_to_teacher_argmax() -> None:
    cls_logits, dist_logits, t_logits, target = _inputs(1)
    teacher = teacher_targets_from_logits(t_logits, 1.0, need_soft=False)
    assert teacher.log_probs is None
    assert torch.equal(teacher.hard_label, t_logits.argmax(1))
    parts = distillation_loss(
        (cls_logits, dist_logits), target, teacher, kind="hard", alpha=0.5, tau=1.0, token="dist"
    )
    want = _manual_hard(dist_logits, t_logits)
    torch.testing.assert_close(parts.distill.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        parts.total.double(), 0.5 * _manual_base(cls_logits, target) + 0.5 * want, rtol=1e-5, atol=1e-6
    )


def test_hard_teacher_smoothing() -> None:
    cls_logits, dist_logits, t_logits, target = _inputs(2)
    teacher = teacher_targets_from_logits(t_logits, 1.0, need_soft=False)
    eps = 0.2
    parts = distillation_loss(
        (cls_logits, dist_logits),
        target,
        teacher,
        kind="hard",
        alpha=0.5,
        tau=1.0,
        token="dist",
        teacher_smoothing=eps,
    )
    smooth = torch.full((B, C), eps / C, dtype=torch.float64)
    smooth[torch.arange(B), t_logits.argmax(1)] += 1 - eps
    torch.testing.assert_close(
        parts.distill.double(), _manual_base(dist_logits, smooth), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_alpha_weighting(alpha: float) -> None:
    cls_logits, dist_logits, t_logits, target = _inputs(3)
    teacher = teacher_targets_from_logits(t_logits, 1.0, need_soft=False)
    parts = distillation_loss(
        (cls_logits, dist_logits), target, teacher, kind="hard", alpha=alpha, tau=1.0, token="dist"
    )
    torch.testing.assert_close(parts.total, (1 - alpha) * parts.base + alpha * parts.distill)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_token_class_puts_teacher_term_on_class_head(kind: str) -> None:
    cls_logits, dist_logits, t_logits, target = _inputs(4, requires_grad=True)
    teacher = teacher_targets_from_logits(t_logits, 2.0, need_soft=True)
    parts = distillation_loss(
        (cls_logits, dist_logits), target, teacher, kind=kind, alpha=0.5, tau=2.0, token="class"
    )
    parts.total.backward()
    assert dist_logits.grad is None or torch.count_nonzero(dist_logits.grad) == 0
    assert cls_logits.grad is not None and torch.count_nonzero(cls_logits.grad) > 0
    want = (
        _manual_kl(cls_logits.detach(), t_logits, 2.0)
        if kind == "soft"
        else _manual_hard(cls_logits.detach(), t_logits)
    )
    torch.testing.assert_close(parts.distill.double(), want, rtol=1e-5, atol=1e-6)


def test_token_class_accepts_a_single_tensor() -> None:
    cls_logits, _, t_logits, target = _inputs(4)
    teacher = teacher_targets_from_logits(t_logits, 1.0, need_soft=False)
    parts = distillation_loss(cls_logits, target, teacher, kind="hard", alpha=0.5, tau=1.0, token="class")
    torch.testing.assert_close(
        parts.distill.double(), _manual_hard(cls_logits, t_logits), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_token_dist_puts_teacher_term_on_dist_head_and_base_on_class_head(kind: str) -> None:
    cls_logits, dist_logits, t_logits, target = _inputs(5, requires_grad=True)
    teacher = teacher_targets_from_logits(t_logits, 1.0, need_soft=True)
    # alpha=1: only the teacher term counts, so only the dist head gets gradient.
    distillation_loss(
        (cls_logits, dist_logits), target, teacher, kind=kind, alpha=1.0, tau=1.0, token="dist"
    ).total.backward()
    assert cls_logits.grad is None or torch.count_nonzero(cls_logits.grad) == 0
    assert torch.count_nonzero(dist_logits.grad) > 0
    # alpha=0: only the base term counts, on the class head.
    cls_logits.grad = dist_logits.grad = None
    distillation_loss(
        (cls_logits, dist_logits), target, teacher, kind=kind, alpha=0.0, tau=1.0, token="dist"
    ).total.backward()
    assert torch.count_nonzero(cls_logits.grad) > 0
    assert dist_logits.grad is None or torch.count_nonzero(dist_logits.grad) == 0


def test_none_ignores_teacher_and_uses_class_head() -> None:
    cls_logits, dist_logits, t_logits, target = _inputs(6, requires_grad=True)
    with_teacher = distillation_loss(
        (cls_logits, dist_logits),
        target,
        teacher_targets_from_logits(t_logits, 1.0, True),
        kind="none",
        alpha=0.5,
        tau=1.0,
        token="dist",
    )
    without = distillation_loss(
        (cls_logits, dist_logits), target, None, kind="none", alpha=0.5, tau=1.0, token="dist"
    )
    assert isinstance(without, LossParts)
    torch.testing.assert_close(with_teacher.total, without.total)
    torch.testing.assert_close(
        without.total.double(), _manual_base(cls_logits.detach(), target), rtol=1e-5, atol=1e-6
    )
    assert float(without.distill) == 0.0
    without.total.backward()
    assert dist_logits.grad is None or torch.count_nonzero(dist_logits.grad) == 0


def test_integer_labels_are_one_hot() -> None:
    cls_logits, dist_logits, _, _ = _inputs(7)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    parts = distillation_loss(
        (cls_logits, dist_logits), labels, None, kind="none", alpha=0.5, tau=1.0, token="dist"
    )
    torch.testing.assert_close(parts.base, torch.nn.functional.cross_entropy(cls_logits, labels))


def test_errors_are_clear() -> None:
    cls_logits, dist_logits, t_logits, target = _inputs(8)
    outs = (cls_logits, dist_logits)
    hard_only = teacher_targets_from_logits(t_logits, 1.0, need_soft=False)
    with pytest.raises(ValueError, match="'medium'"):
        distillation_loss(outs, target, hard_only, kind="medium", alpha=0.5, tau=1.0, token="dist")
    with pytest.raises(ValueError, match="'both'"):
        distillation_loss(outs, target, hard_only, kind="hard", alpha=0.5, tau=1.0, token="both")
    with pytest.raises(ValueError, match="teacher=None"):
        distillation_loss(outs, target, None, kind="hard", alpha=0.5, tau=1.0, token="dist")
    with pytest.raises(ValueError, match="need_soft=True"):
        distillation_loss(outs, target, hard_only, kind="soft", alpha=0.5, tau=1.0, token="dist")
    with pytest.raises(ValueError, match="set_distilled_training"):
        distillation_loss(cls_logits, target, hard_only, kind="hard", alpha=0.5, tau=1.0, token="dist")
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(outs, target, hard_only, kind="hard", alpha=1.5, tau=1.0, token="dist")
    with pytest.raises(ValueError, match="mixed_target"):
        distillation_loss(outs, target[:, :3], hard_only, kind="hard", alpha=0.5, tau=1.0, token="dist")
    soft_t2 = teacher_targets_from_logits(t_logits, 2.0, need_soft=True)
    with pytest.raises(ValueError, match="tau=2.0"):
        distillation_loss(outs, target, soft_t2, kind="soft", alpha=0.5, tau=1.0, token="dist")
    with pytest.raises(ValueError, match="pair"):
        distillation_loss((cls_logits,), target, hard_only, kind="hard", alpha=0.5, tau=1.0, token="dist")


# ------------------------------------------------------------------------------ store reconstruction


def _fake_store(logits: np.ndarray, k: int):
    """What the teacher stage writes: top-k sorted by logit (fp16), classes, fp32 logsumexp, argmax."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    topk = np.take_along_axis(logits, order, axis=1).astype(np.float16)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(1)).astype(np.float32)
    return topk, order.astype(np.uint16), lse, logits.argmax(1).astype(np.uint16)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_store_dense_reconstruction_is_log_softmax(tau: float) -> None:
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((B, C))).astype(np.float32)
    topk, classes, lse, hard = _fake_store(logits, k=C)
    t = teacher_targets_from_store(topk, classes, lse, hard, C, tau, need_soft=True)
    want = torch.log_softmax(torch.from_numpy(logits) / tau, dim=1)
    assert t.hard_label.dtype == torch.int64
    assert torch.equal(t.hard_label, torch.from_numpy(logits).argmax(1))
    assert t.log_probs is not None and t.tau == tau
    # fp16 storage: |Δlogit| ≤ 2^-11·|logit|, so ≤ ~2·max|logit|·2^-11/τ on a log-prob.
    tol = 2 * float(np.abs(logits).max()) * 2.0**-11 / tau + 1e-6
    torch.testing.assert_close(t.log_probs, want, rtol=0, atol=tol)
    torch.testing.assert_close(t.log_probs.exp().sum(1), torch.ones(B), rtol=0, atol=1e-5)


def test_store_tail_spreading_when_k_lt_c() -> None:
    rng = np.random.default_rng(1)
    n_cls, k = 12, 3
    logits = (2 * rng.standard_normal((B, n_cls))).astype(np.float32)
    topk, classes, lse, hard = _fake_store(logits, k=k)
    t = teacher_targets_from_store(
        torch.from_numpy(topk),
        torch.from_numpy(classes.astype(np.int64)),
        torch.from_numpy(lse),
        torch.from_numpy(hard.astype(np.int64)),
        n_cls,
        1.0,
        need_soft=True,
    )
    p = t.log_probs.exp().double()
    torch.testing.assert_close(p.sum(1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-5)
    true_p = torch.softmax(torch.from_numpy(logits).double(), 1)
    for b in range(B):
        stored = classes[b].astype(np.int64)
        unstored = np.setdiff1d(np.arange(n_cls), stored)
        # stored classes keep their probability; the tail is spread evenly over the rest
        torch.testing.assert_close(p[b, stored], true_p[b, stored], rtol=2e-3, atol=1e-4)
        tail = 1 - true_p[b, stored].sum()
        torch.testing.assert_close(
            p[b, unstored],
            torch.full((len(unstored),), float(tail) / len(unstored), dtype=torch.float64),
            rtol=2e-3,
            atol=1e-4,
        )
    # at another temperature the result is still a distribution
    t3 = teacher_targets_from_store(topk, classes, lse, hard, n_cls, 3.0, need_soft=True)
    torch.testing.assert_close(t3.log_probs.exp().sum(1), torch.ones(B), rtol=0, atol=1e-5)


def test_store_hard_only_and_derived_hard_label() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((B, C)).astype(np.float32)
    topk, classes, lse, hard = _fake_store(logits, k=2)
    t = teacher_targets_from_store(None, None, None, hard, C, 1.0, need_soft=False)
    assert t.log_probs is None and torch.equal(t.hard_label, torch.from_numpy(logits.argmax(1)))
    derived = teacher_targets_from_store(topk, classes, lse, None, C, 1.0, need_soft=False)
    assert torch.equal(derived.hard_label, t.hard_label)


def test_store_rejects_corrupt_topk() -> None:
    topk = np.zeros((2, 2), np.float16)
    lse = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="repeats"):
        teacher_targets_from_store(topk, np.array([[1, 1], [0, 1]]), lse, None, 4, 1.0, need_soft=True)
    with pytest.raises(ValueError, match="out of range"):
        teacher_targets_from_store(topk, np.array([[1, 9], [0, 1]]), lse, None, 4, 1.0, need_soft=True)


def test_store_targets_feed_the_loss_like_online_targets() -> None:
    cls_logits, dist_logits, _, target = _inputs(9)
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((B, C)).astype(np.float32)
    topk, classes, lse, hard = _fake_store(logits, k=C)
    offline = teacher_targets_from_store(topk, classes, lse, hard, C, 2.0, need_soft=True)
    online = teacher_targets_from_logits(torch.from_numpy(logits), 2.0, need_soft=True)
    kw = dict(kind="soft", alpha=0.5, tau=2.0, token="dist")
    a = distillation_loss((cls_logits, dist_logits), target, offline, **kw).total
    b = distillation_loss((cls_logits, dist_logits), target, online, **kw).total
    assert math.isclose(float(a), float(b), rel_tol=1e-3)
    assert isinstance(offline, TeacherTargets)


@pytest.mark.parametrize(("n_cls", "k", "tau"), [(12, 3, 1.0), (12, 3, 2.5), (7, 7, 1.0), (7, 7, 4.0)])
def test_numpy_and_torch_rebuild_the_same_distribution(n_cls: int, k: int, tau: float) -> None:
    """store.dense_soft_target (numpy, audits) and dense_log_probs_from_topk (torch, the loss) are twins."""
    import store

    rng = np.random.default_rng(4)
    logits = (2 * rng.standard_normal((B, n_cls))).astype(np.float32)
    topk, classes, lse, _ = _fake_store(logits, k=k)
    numpy_p = store.dense_soft_target(topk, classes, lse, n_cls, tau=tau)
    torch_p = dense_log_probs_from_topk(torch.from_numpy(topk.astype(np.float32)),
                                        torch.from_numpy(classes.astype(np.int64)), torch.from_numpy(lse),
                                        n_cls, tau).exp()
    np.testing.assert_allclose(torch_p.numpy(), numpy_p, rtol=1e-4, atol=1e-6)
