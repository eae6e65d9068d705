"""The shipped configs validate, and the paper recipe builds both of its models (without weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.config import DEFAULT_CONFIG, ConfigError, load_config
from pipeline.train.models import create_student, create_teacher

ROOT = Path(__file__).resolve().parent.parent


def test_demo_config_is_the_default_and_validates():
    cfg = load_config()
    assert DEFAULT_CONFIG == ROOT / "configs" / "demo.yaml"
    assert cfg.data.source == "idx" and cfg.aug.channels == 1


def test_params_yaml_ships_as_the_demo_config():
    """`make demo` runs dvc.yaml on params.yaml: as shipped, it is configs/demo.yaml (the embedded default). A fork
    that runs its own config through DVC changes params.yaml, and this test with it."""
    params, demo = (yaml.safe_load((ROOT / name).read_text()) for name in ("params.yaml", "configs/demo.yaml"))
    assert params == demo, "params.yaml (what `make demo` runs) differs from configs/demo.yaml"
    pipeline = (ROOT / "dvc.yaml").read_text()
    assert "configs/demo.yaml" not in pipeline.split("stages:", 1)[1]  # every stage runs params.yaml


def test_imagenet_config_is_the_paper_recipe_and_builds_both_models():
    cfg = load_config(ROOT / "configs" / "imagenet.yaml")
    assert (cfg.teacher.model, cfg.student.model) == ("regnety_160.deit_in1k", "deit_small_distilled_patch16_224")
    assert (cfg.student.epochs, cfg.student.batch_size * 8, cfg.student.distillation) == (300, 1024, "hard")
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.reprob, cfg.student.drop_path) == (0.8, 1.0, 0.25, 0.1)
    assert cfg.aug.auto_augment.startswith("rand-m9")
    student = create_student(cfg.student, num_classes=1000, img_size=224, in_chans=3)
    assert type(student).__name__ == "VisionTransformerDistilled"
    teacher = create_teacher(cfg.teacher.model_copy(update={"pretrained": False}), num_classes=1000, in_chans=3)
    assert sum(p.numel() for p in teacher.parameters()) > 80_000_000


def test_section_hash_is_stable_and_section_specific():
    a = load_config()
    b = load_config(overrides=["student.epochs=3"])
    assert a.section_hash("aug") == b.section_hash("aug")
    assert a.section_hash("student") != b.section_hash("student")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("aug.bogus=1", "aug.bogus: unknown key"),
        ("teacher.topk=0", "teacher.topk"),
        ("aug.scale=[0.9, 0.1]", "aug.scale"),
        ("student.distillation=medium", "student.distillation"),
        ("aug.mean=[0.1, 0.2]", "aug.mean needs 1 value"),
    ],
)
def test_bad_values_name_the_key_and_value(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert needle in str(err.value)
    assert "demo.yaml" in str(err.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["student.epochs"])


def test_teacher_fit_aug_overrides_apply_to_fitting_only():
    cfg = load_config(overrides=["teacher.fit.aug={mix_prob: 0.0, reprob: 0.0}"])
    assert cfg.fit_aug().mix_prob == 0.0 and cfg.fit_aug().reprob == 0.0
    assert cfg.aug.mix_prob == 1.0 and cfg.aug.reprob == 0.25


def test_teacher_fit_aug_override_with_a_bad_key_is_named():
    with pytest.raises(ConfigError, match="teacher.fit.aug.bogus"):
        load_config(overrides=["teacher.fit.aug={bogus: 1}"])


def test_bad_auto_augment_string_is_a_config_error():
    with pytest.raises(ConfigError, match="aug.auto_augment"):
        load_config(overrides=["aug.auto_augment=bogus"])


def test_store_level_out_of_range_for_codec_is_a_config_error():
    with pytest.raises(ConfigError, match="store.level 12 is out of range for gzip"):
        load_config(overrides=["store.codec=gzip", "store.level=12"])
