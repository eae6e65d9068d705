"""Student/teacher factories and teacher checkpoints, on tiny models (16-32 px, a few layers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from pipeline.core.config import StudentConfig, TeacherConfig
from pipeline.core.files import sha256_file as file_sha256
from pipeline.train import models
from pipeline.train.models import (
    CheckpointNotFoundError,
    ModelError,
    create_student,
    create_teacher,
    load_teacher,
    save_teacher_checkpoint,
    student_heads,
)

TINY_STUDENT = StudentConfig(
    model="deit_tiny_distilled_patch16_224", patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path=0.0
)


def _student(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_student(TINY_STUDENT, num_classes=5, img_size=16, in_chans=1, **kw)


def test_create_student_overrides_and_two_heads() -> None:
    model = _student()
    assert isinstance(model, VisionTransformerDistilled)
    assert model.patch_embed.patch_size == (4, 4)
    assert model.patch_embed.proj.in_channels == 1
    assert model.embed_dim == 32 and len(model.blocks) == 2
    assert model.blocks[0].attn.num_heads == 2
    assert model.head.out_features == 5 and model.head_dist.out_features == 5
    assert model.pos_embed.shape == (1, 16 + 2, 32)

    x = torch.randn(3, 1, 16, 16)
    model.train()
    model.set_distilled_training(True)
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == out[1].shape == (3, 5)


def test_create_student_drop_path() -> None:
    cfg = TINY_STUDENT.model_copy(update={"drop_path": 0.2})
    model = create_student(cfg, num_classes=3, img_size=16, in_chans=3)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18", "deit_tiny_patch16_224"])
def test_create_student_refuses_non_distilled(name: str) -> None:
    cfg = TINY_STUDENT.model_copy(update={"model": name})
    with pytest.raises(ModelError, match=name):
        create_student(cfg, num_classes=5, img_size=16, in_chans=1)


def test_create_student_unknown_name_and_bad_img_size() -> None:
    with pytest.raises(ModelError, match="no_such_model"):
        create_student(
            TINY_STUDENT.model_copy(update={"model": "no_such_model"}), num_classes=5, img_size=16, in_chans=1
        )
    with pytest.raises(ModelError, match="patch size 4"):
        create_student(TINY_STUDENT, num_classes=5, img_size=18, in_chans=1)


def test_student_heads_fused_equals_eval_forward() -> None:
    model = _student()
    x = torch.randn(2, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        cls_logits, dist_logits = student_heads(model, x)
        fused = model(x)
    torch.testing.assert_close((cls_logits + dist_logits) / 2, fused)
    assert not torch.allclose(cls_logits, dist_logits)
    # the same heads as the distilled-training forward (no dropout in this tiny model)
    model.train()
    model.set_distilled_training(True)
    with torch.no_grad():
        train_cls, train_dist = model(x)
        heads_cls, heads_dist = student_heads(model, x)
    torch.testing.assert_close(train_cls, heads_cls)
    torch.testing.assert_close(train_dist, heads_dist)


# ----------------------------------------------------------------------------------------- teacher


def test_small_stem_resnet18_keeps_28px() -> None:
    model = create_teacher(TeacherConfig(model="resnet18", small_stem=True), num_classes=10, in_chans=1)
    assert isinstance(model.conv1, nn.Conv2d)
    assert (
        model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3) and model.conv1.padding == (1, 1)
    )
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64
    assert isinstance(model.maxpool, nn.Identity)
    model.eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        early = model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))
        out = model(x)
    assert early.shape == (1, 64, 28, 28)
    assert out.shape == (1, 10)


def test_small_stem_other_families() -> None:
    deep = create_teacher(TeacherConfig(model="test_resnet", small_stem=True), num_classes=4, in_chans=1)
    assert deep.conv1[0].stride == (1, 1) and isinstance(deep.maxpool, nn.Identity)
    eff = create_teacher(TeacherConfig(model="test_efficientnet", small_stem=True), num_classes=4, in_chans=3)
    assert eff.conv_stem.stride == (1, 1)
    with torch.no_grad():
        assert eff.eval()(torch.randn(1, 3, 28, 28)).shape == (1, 4)


def _tiny_teacher_cfg(**kw) -> TeacherConfig:
    return TeacherConfig(model="test_resnet", small_stem=True, **kw)


def test_checkpoint_round_trip_and_sha(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _tiny_teacher_cfg()
    model = create_teacher(cfg, num_classes=4, in_chans=1)
    # make BN statistics non-default so they must round-trip too
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28))
    path = tmp_path / "sub" / "teacher.pt"
    sha = save_teacher_checkpoint(
        model, path, {"model": "test_resnet", "small_stem": True, "where": tmp_path}
    )
    assert sha == file_sha256(path)
    assert not list(path.parent.glob("*.tmp"))
    blob = torch.load(path, weights_only=True)
    assert blob["meta"]["where"] == str(tmp_path)

    loaded, ident = load_teacher(cfg.model_copy(update={"checkpoint": path}), num_classes=4, in_chans=1)
    assert ident == sha
    assert not loaded.training
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp"])
def test_checkpoint_formats(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(1)
    model = create_teacher(_tiny_teacher_cfg(), num_classes=4, in_chans=1).eval()
    sd = model.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd},
        "state_dict": {"state_dict": sd, "epoch": 3},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / f"{wrap}.pt"
    torch.save(obj, path)
    loaded = create_teacher(_tiny_teacher_cfg(checkpoint=path), num_classes=4, in_chans=1).eval()
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_missing_checkpoint_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "teacher.pt"
    with pytest.raises(CheckpointNotFoundError, match=str(path)):
        create_teacher(_tiny_teacher_cfg(checkpoint=path), num_classes=4, in_chans=1)
    with pytest.raises(FileNotFoundError, match="teacher-fit"):
        load_teacher(_tiny_teacher_cfg(checkpoint=path), num_classes=4, in_chans=1)
    with pytest.raises(CheckpointNotFoundError, match=str(path)):
        create_teacher(_tiny_teacher_cfg(checkpoint=path, pretrained=True), num_classes=4, in_chans=1)


def test_corrupt_checkpoint_names_path(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy()
    )
    with pytest.raises(ModelError, match=str(path)):
        create_teacher(_tiny_teacher_cfg(checkpoint=path), num_classes=4, in_chans=1)
    with pytest.raises(ModelError, match=str(path)):
        create_teacher(_tiny_teacher_cfg(checkpoint=path, pretrained=True), num_classes=4, in_chans=1)
    # a torch file that is not a state_dict
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelError, match="not a model state_dict"):
        create_teacher(_tiny_teacher_cfg(checkpoint=path), num_classes=4, in_chans=1)


def test_mismatched_checkpoint_names_keys(tmp_path: Path) -> None:
    other = create_teacher(TeacherConfig(model="test_efficientnet"), num_classes=4, in_chans=1)
    path = tmp_path / "effnet.pt"
    save_teacher_checkpoint(other, path, {"model": "test_efficientnet"})
    with pytest.raises(ModelError) as err:
        create_teacher(_tiny_teacher_cfg(checkpoint=path), num_classes=4, in_chans=1)
    msg = str(err.value)
    assert str(path) in msg and "missing: conv1.0.weight" in msg and "unexpected: conv_stem.weight" in msg
    assert "model='test_efficientnet'" in msg

    # same architecture, other class count: shape mismatch on the classifier, named
    same = create_teacher(_tiny_teacher_cfg(), num_classes=7, in_chans=1)
    save_teacher_checkpoint(same, path, {})
    with pytest.raises(ModelError, match=r"shape mismatch: fc\.weight \(7, \d+\) vs model \(4, \d+\)"):
        create_teacher(_tiny_teacher_cfg(checkpoint=path), num_classes=4, in_chans=1)


def test_pretrained_from_local_file_overlay(tmp_path: Path) -> None:
    torch.manual_seed(2)
    # "ImageNet" weights as timm ships them: 3 channels, 1000 classes, original stem
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "test_resnet_in1k.pth"
    torch.save(source.state_dict(), path)
    cfg = TeacherConfig(model="test_resnet", pretrained=True, checkpoint=path)
    model, ident = load_teacher(cfg, num_classes=10, in_chans=1)
    assert ident == file_sha256(path)
    assert model.fc.out_features == 10
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    # timm adapts the 3-channel stem to 1 channel by summing over input channels
    torch.testing.assert_close(model.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)

    # the same file with a small stem: weights loaded, then the stem runs at stride 1
    small = create_teacher(cfg.model_copy(update={"small_stem": True}), num_classes=10, in_chans=1)
    assert small.conv1[0].stride == (1, 1)
    torch.testing.assert_close(small.layer1[0].conv1.weight, source.layer1[0].conv1.weight)

    # a file from another architecture is refused, naming the file
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), wrong)
    with pytest.raises(ModelError, match=str(wrong)):
        create_teacher(cfg.model_copy(update={"checkpoint": wrong}), num_classes=10, in_chans=1)


def test_pretrained_hub_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(models.timm, "create_model", offline)
    with pytest.raises(ModelError, match="teacher.checkpoint") as err:
        load_teacher(TeacherConfig(model="test_resnet", pretrained=True), num_classes=4, in_chans=1)
    assert "distill teacher-fit" in str(err.value) and "test_resnet" in str(err.value)


def test_load_teacher_refuses_random_weights() -> None:
    with pytest.raises(ModelError, match="no weights"):
        load_teacher(TeacherConfig(model="test_resnet"), num_classes=4, in_chans=1)


def test_unknown_teacher_name() -> None:
    with pytest.raises(ModelError, match="not_a_cnn"):
        create_teacher(TeacherConfig(model="not_a_cnn"), num_classes=4, in_chans=1)


def test_small_stem_on_pretrained_resnet_weights_is_refused_before_any_download() -> None:
    # resnet18's 7x7 conv1 would be replaced by a random 3x3 one; no weights are fetched to find that out
    with pytest.raises(ModelError, match="new, randomly initialised stem conv"):
        create_teacher(TeacherConfig(model="resnet18", pretrained=True, small_stem=True), num_classes=10, in_chans=1)
