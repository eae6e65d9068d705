"""Model factories (timm): the DeiT student and the CNN teacher, and teacher checkpoints.

The student is always a timm ``VisionTransformerDistilled`` (class token + distillation token, two
heads), so every distillation mode trains the same architecture and the heads can be reported
separately. The teacher is any timm CNN, optionally with a small stem for 28 to 64 px inputs, loaded
from a local checkpoint (the usual case: this project often runs where no weights can be downloaded)
or from timm's pretrained weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from pipeline.core.config import Config, StudentConfig, TeacherConfig
from pipeline.core.errors import DistillError
from pipeline.core.files import atomic_torch_save, local_copy, location, sha256_file, torch_load


class ModelError(DistillError, ValueError):
    """A model or checkpoint that cannot be built or loaded; the message names the model or file."""


class CheckpointNotFoundError(ModelError, FileNotFoundError):
    """The configured teacher checkpoint file does not exist."""


# ----------------------------------------------------------------------------------------- student


def create_student(cfg: StudentConfig, *, num_classes: int, img_size: int, in_chans: int) -> nn.Module:
    """Build the DeiT student from ``cfg.model`` with the config's architecture overrides.

    Only distilled DeiT models (``deit_*_distilled_*``, timm ``VisionTransformerDistilled``) are
    accepted: every mode, ``none`` included, then trains the same two-token network. Weights are random
    (pretrained=False); ``distilled_training`` is left off, the trainer turns it on.
    """
    if not timm.is_model(cfg.model):
        raise ModelError(f"student.model {cfg.model!r}: unknown timm model")
    overrides = {
        k: v
        for k, v in (
            ("patch_size", cfg.patch_size),
            ("embed_dim", cfg.embed_dim),
            ("depth", cfg.depth),
            ("num_heads", cfg.num_heads),
        )
        if v is not None
    }
    try:
        model = timm.create_model(
            cfg.model,
            pretrained=False,
            num_classes=num_classes,
            img_size=img_size,
            in_chans=in_chans,
            drop_path_rate=cfg.drop_path,
            **overrides,
        )
    except (TypeError, AssertionError, ValueError) as e:
        raise ModelError(
            f"student.model {cfg.model!r} cannot be built with img_size={img_size}, in_chans={in_chans}, "
            f"{overrides}: {e} (the student must be a distilled DeiT, e.g. deit_tiny_distilled_patch16_224)"
        ) from e
    if not isinstance(model, VisionTransformerDistilled):
        raise ModelError(
            f"student.model {cfg.model!r} is a {type(model).__name__}, not a distilled DeiT "
            "(VisionTransformerDistilled, e.g. deit_tiny_distilled_patch16_224)"
        )
    patch = model.patch_embed.patch_size
    if img_size % patch[0] or img_size % patch[1]:
        raise ModelError(
            f"student.model {cfg.model!r}: img_size {img_size} is not a multiple of patch size {patch[0]}"
        )
    return model


def student_heads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-head and dist-head logits, whatever the model's mode, for per-head evaluation.

    timm's forward returns the fused ``(cls + dist) / 2`` in eval; this reads both heads from the same
    features so class, dist and fused accuracy come from one forward pass.
    """
    if not isinstance(model, VisionTransformerDistilled):
        raise ModelError(f"student_heads needs a VisionTransformerDistilled, got {type(model).__name__}")
    feats = model.forward_features(x)
    cls_tok = model.head_drop(feats[:, 0])
    dist_tok = model.head_drop(feats[:, 1])
    return model.head(cls_tok), model.head_dist(dist_tok)


# ----------------------------------------------------------------------------------------- teacher


def _replaces_stem_conv(model: nn.Module) -> bool:
    """Whether :func:`_small_stem` swaps the stem conv for a new one (a ResNet-style 7×7 conv1 + max-pool)."""
    return isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")


def _small_stem(model: nn.Module, name: str) -> None:
    """Adapt a CNN for 28 to 64 px inputs: stride-1 3×3 stem and no max-pool (ResNet family) or a
    stride-1 first conv (others), so the early layers do not throw away most of a tiny image."""
    conv1 = getattr(model, "conv1", None)
    if conv1 is not None and hasattr(model, "maxpool"):
        if _replaces_stem_conv(model):
            model.conv1 = nn.Conv2d(
                conv1.in_channels,
                conv1.out_channels,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=conv1.bias is not None,
            )
        elif isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
            conv1[0].stride = (1, 1)  # deep stem (resnet*d, *t): already 3×3 convs
        else:
            raise ModelError(f"teacher.small_stem: cannot adapt {name!r}: conv1 is a {type(conv1).__name__}")
        model.maxpool = nn.Identity()
        return
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    module = None
    if isinstance(first, str):
        try:
            module = model.get_submodule(first)
        except AttributeError:
            module = None
    if not isinstance(module, nn.Conv2d):
        raise ModelError(
            f"teacher.small_stem: cannot adapt {name!r}: it has no ResNet conv1/maxpool and its first conv "
            f"({first!r}) is not a Conv2d; set teacher.small_stem: false or use a ResNet/RegNet teacher"
        )
    module.stride = (1, 1)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept {'model': sd}, {'state_dict': sd} (with an optional 'meta') or a bare state_dict."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"teacher.checkpoint {path}: not a model state_dict (expected a mapping of tensors, or "
            "{'model': state_dict} / {'state_dict': state_dict})"
        )
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not location(path).is_file():
        raise CheckpointNotFoundError(
            f"teacher.checkpoint {path}: file not found (train one with `distill teacher-fit`)"
        )
    try:
        obj = torch_load(path)
    except ValueError as e:
        raise ModelError(f"teacher.checkpoint {path}: not a readable torch checkpoint: {e}") from e
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    return _extract_state_dict(obj, path), dict(meta) if isinstance(meta, Mapping) else {}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> None:
    """Strict load with an error that lists the first mismatching keys, not torch's wall of text."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        hint = ""
        if meta:
            hint = " (checkpoint meta: " + ", ".join(
                f"{k}={meta[k]!r}" for k in ("model", "small_stem", "num_classes", "in_chans") if k in meta
            ) + ")"
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        raise ModelError(
            f"teacher.checkpoint {path}: does not fit {arch!r} as configured{hint}; " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


def create_teacher(cfg: TeacherConfig, *, num_classes: int, in_chans: int) -> nn.Module:
    """Build the teacher CNN named by ``cfg.model`` and load its weights.

    - ``checkpoint`` only: the file (``save_teacher_checkpoint`` output, a bare state_dict, or
      ``{'model'|'state_dict': state_dict}``) must fit the configured network exactly (small stem
      included, so a ``distill teacher-fit`` checkpoint loads back as it was trained).
    - ``pretrained`` only: timm's pretrained weights from the hub; offline this fails with an error
      pointing at ``teacher.checkpoint`` and ``distill teacher-fit``.
    - both: timm pretrained weights read from the local file (timm's ``pretrained_cfg_overlay``), so
      timm adapts the classifier to ``num_classes`` and the first conv to ``in_chans``.
    - neither: random weights (only useful for tests).

    ``small_stem`` with pretrained weights is refused where it would put a new, random stem conv on
    them (ResNet-style stems; checked before any download); other models keep their first conv's
    weights at stride 1.
    """
    if not timm.is_model(cfg.model):
        raise ModelError(f"teacher.model {cfg.model!r}: unknown timm model")
    ckpt = str(cfg.checkpoint) if cfg.checkpoint is not None else None
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if cfg.pretrained:
        if cfg.small_stem and _replaces_stem_conv(timm.create_model(cfg.model, pretrained=False, **kwargs)):
            raise ModelError(
                f"teacher.small_stem with teacher.pretrained: {cfg.model!r} would get a new, randomly "
                "initialised stem conv on top of its pretrained weights; fine-tune it with `distill teacher-fit` "
                "(pretrained: false) or use teacher.small_stem: false"
            )
        if ckpt is not None and not location(ckpt).is_file():
            raise CheckpointNotFoundError(f"teacher.checkpoint {ckpt}: file not found")
        try:
            with local_copy(ckpt) as local:  # timm reads a local file
                if local is not None:
                    kwargs["pretrained_cfg_overlay"] = {"file": local}
                model = timm.create_model(cfg.model, pretrained=True, **kwargs)
        except Exception as e:
            if ckpt is not None:
                raise ModelError(
                    f"teacher.checkpoint {ckpt}: cannot load it as timm pretrained weights for "
                    f"{cfg.model!r}: {type(e).__name__}: {e}"
                ) from e
            raise ModelError(
                f"teacher.model {cfg.model!r}: cannot get timm pretrained weights ({type(e).__name__}: {e}). "
                "Without internet access, set teacher.checkpoint to a local file, or train a teacher with "
                "`distill teacher-fit` and set teacher.pretrained: false"
            ) from e
        if cfg.small_stem:
            _small_stem(model, cfg.model)
        return model

    model = timm.create_model(cfg.model, pretrained=False, **kwargs)
    if cfg.small_stem:
        _small_stem(model, cfg.model)
    if ckpt is not None:
        state, meta = _read_checkpoint(ckpt)
        _load_into(model, state, ckpt, meta)
    return model


def save_teacher_checkpoint(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any]) -> str:
    """Write ``{'model': state_dict, 'meta': meta}`` atomically and return the file's sha256.

    A crash never leaves a half-written checkpoint that a later stage would hash and trust. ``meta`` is
    normalised through JSON (paths become strings) so the file loads with ``torch.load(weights_only=True)``.
    """
    plain_meta = json.loads(json.dumps(meta, default=str))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, "meta": plain_meta}, path)
    return sha256_file(path)


def load_teacher(cfg: TeacherConfig, *, num_classes: int, in_chans: int) -> tuple[nn.Module, str]:
    """The teacher in eval mode and its identity for provenance; refuses a teacher without weights.

    The identity is the checkpoint file's sha256 when a file is used (pretrained overlay included), and
    ``pretrained:<model>`` for timm hub weights.
    """
    if cfg.checkpoint is None and not cfg.pretrained:
        raise ModelError(
            f"teacher {cfg.model!r} has no weights: set teacher.checkpoint (e.g. from `distill teacher-fit`) "
            "or teacher.pretrained: true; a random teacher would fill the store with noise"
        )
    model = create_teacher(cfg, num_classes=num_classes, in_chans=in_chans)
    model.eval()
    return model, teacher_identity(cfg)


def teacher_identity(cfg: TeacherConfig) -> str:
    """What identifies the teacher's weights in provenance: the checkpoint's sha256, or the hub name."""
    return sha256_file(cfg.checkpoint) if cfg.checkpoint is not None else f"pretrained:{cfg.model}"


def teacher_fit_samples(cfg: TeacherConfig) -> int | None:
    """How many of the first ingested train images the teacher was fit on, when its checkpoint says
    (``distill teacher-fit`` records it); None for hub weights or other files: the audit cannot tell."""
    if cfg.checkpoint is None or cfg.pretrained:
        return None
    n = _read_checkpoint(str(cfg.checkpoint))[1].get("fit_samples")
    return int(n) if isinstance(n, int) else None


def resolve_teacher(cfg: Config) -> Config:
    """Without a checkpoint or hub weights, the teacher is the one ``distill teacher-fit`` wrote."""
    t = cfg.teacher
    if t.checkpoint is not None or t.pretrained:
        return cfg
    if not location(t.fit.output).is_file():
        raise CheckpointNotFoundError(
            f"no teacher weights: {t.fit.output} does not exist. Run `distill teacher-fit` first, "
            "or set teacher.checkpoint (a local file) or teacher.pretrained: true."
        )
    return cfg.model_copy(update={"teacher": t.model_copy(update={"checkpoint": str(t.fit.output)})})


def teacher_forward(model: nn.Module, x: torch.Tensor, device: torch.device, to_cpu: bool = True) -> torch.Tensor:
    """Teacher logits in float32; bf16 autocast and channels_last on CUDA, plain float32 on CPU."""
    with torch.no_grad():  # not inference_mode: online targets feed the student's loss, outside it
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x.contiguous(memory_format=torch.channels_last))
        else:
            out = model(x)
    out = out.float()
    return out.cpu() if to_cpu else out
