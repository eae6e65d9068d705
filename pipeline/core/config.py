"""Typed, validated configuration: one YAML file drives every stage.

Every section is a strict pydantic model, so a typo in a key or a value out of range fails at load
time with the key path and the value, rather than deep inside a stage. Section hashes give stable
provenance for the shards and the logit store.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import DistillError
from pipeline.core.files import check_scheme
from store.layout import CODEC_LEVELS, CODECS

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, os.PathLike) else value


def _scheme(value: str) -> str:
    check_scheme(value)
    return value


Location = Annotated[str, BeforeValidator(_text), AfterValidator(_scheme)]
"""A local path or an fsspec URL (``s3://bucket/x``, ``gs://``, ``memory://``); a scheme with no filesystem
installed is refused at load time, naming the package."""


class ConfigError(DistillError, ValueError):
    """A config that cannot be used; the message names the file, key path and value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    """Where images come from and how they are sharded."""

    source: Literal["idx", "imagefolder"] = "idx"
    root: Location | None = None
    """idx: folder holding train-images-idx3-ubyte[.gz], train-labels-..., t10k-images-..., t10k-labels-..."""
    train_root: Location | None = None
    """imagefolder: one sub-folder per class of JPEG/PNG files."""
    val_root: Location | None = None
    class_names: list[str] | None = None
    """idx only: names for class ids 0..C-1 (imagefolder takes the sorted folder names)."""
    shards: Location = "data/shards"
    shard_size: PosInt = 1000
    train_limit: PosInt | None = None
    """Keep only the first N train samples after the seeded shuffle (a reproducible subset)."""
    val_limit: PosInt | None = None
    train_shards: PosInt | None = None
    """Teacher and student use only the first N train shards (a reproducible subset of the full ingest)."""
    allow_corrupt: bool = False
    """Skip unreadable images (counted and listed in the manifest) instead of stopping."""
    label_noise: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Flip this seeded fraction of the training labels to another class, on purpose (recorded in the manifest):
    to score the label audit on known errors."""
    label_noise_kind: Literal["uniform", "confusable"] = "uniform"
    """uniform: any other class; confusable: another class drawn from the row of ``label_noise_confusion`` (the
    classes the data's own confusion makes likely), as real label noise is."""
    label_noise_confusion: Location | list[list[NonNegFloat]] | None = None
    """confusable noise: a C x C matrix (rows: true class, columns: the class it is confused with; the diagonal is
    ignored), inline or a file: a teacher-fit report (``teacher.fit.output`` with ``.json``: its ``val_confusion``)
    or a JSON/YAML list of rows."""
    relabel: Location | None = None
    """Corrections to the training labels (CSV or parquet: ``index`` or ``key``, ``label``: a class id, a class
    name or ``drop``), applied by ingest as the manifest's label layer: the shards are not rewritten."""

    @model_validator(mode="after")
    def _roots_for_source(self) -> DataConfig:
        if self.source == "idx" and self.root is None:
            raise ValueError("data.root is required when data.source is 'idx'")
        if self.source == "imagefolder" and (self.train_root is None or self.val_root is None):
            raise ValueError(
                "data.train_root and data.val_root are required when data.source is 'imagefolder'"
            )
        return self

    @model_validator(mode="after")
    def _confusion_for_confusable(self) -> DataConfig:
        if self.label_noise_kind == "confusable" and self.label_noise_confusion is None:
            raise ValueError("data.label_noise_kind 'confusable' needs data.label_noise_confusion (a C x C matrix, or "
                             "a teacher-fit report whose val_confusion gives it)")
        return self


class AugConfig(Strict):
    """The DeiT training recipe (defaults follow the official DeiT code) and the evaluation view."""

    img_size: Annotated[int, Field(ge=8, le=1024)] = 224
    channels: Literal[1, 3] = 3
    """Model input channels; grayscale images are replicated to 3 when this is 3."""
    scale: tuple[Fraction, Fraction] = (0.08, 1.0)
    ratio: tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)]] = (3 / 4, 4 / 3)
    interpolation: Literal["bilinear", "bicubic", "nearest", "random"] = "bicubic"
    hflip: Prob = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment/AutoAugment config string, or null for none."""
    color_jitter: NonNegFloat = 0.3
    """Used only when auto_augment is null (as in timm)."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[Annotated[float, Field(gt=0.0)], ...] = (0.229, 0.224, 0.225)
    reprob: Prob = 0.25
    remode: Literal["const", "rand", "pixel"] = "pixel"
    recount: PosInt = 1
    mixup: NonNegFloat = 0.8
    """Mixup Beta(α, α); 0 disables."""
    cutmix: NonNegFloat = 1.0
    """CutMix Beta(α, α); 0 disables."""
    mix_prob: Prob = 1.0
    switch_prob: Prob = 0.5
    smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    window: Annotated[int, Field(ge=2, le=65536)] = 256
    """Mixup/CutMix partners are drawn within windows of this many samples of a shard."""
    crop_pct: Annotated[float, Field(gt=0.0, le=1.0)] = 0.875

    @model_validator(mode="after")
    def _check(self) -> AugConfig:
        if self.scale[0] > self.scale[1]:
            raise ValueError(f"aug.scale must be (min, max) with min <= max, got {list(self.scale)}")
        if self.ratio[0] > self.ratio[1]:
            raise ValueError(f"aug.ratio must be (min, max) with min <= max, got {list(self.ratio)}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                raise ValueError(
                    f"aug.{name} needs {self.channels} value(s) for aug.channels={self.channels}, "
                    f"got {list(getattr(self, name))}"
                )
        return self

    @model_validator(mode="after")
    def _auto_augment(self) -> AugConfig:
        if self.auto_augment:
            from timm.data.transforms_factory import transforms_imagenet_train

            try:
                transforms_imagenet_train(img_size=self.img_size, auto_augment=self.auto_augment)
            except Exception as e:
                raise ValueError(
                    f"aug.auto_augment {self.auto_augment!r} is not a timm augmentation string: {e}"
                ) from None
        return self


class TeacherFitConfig(Strict):
    """Training the teacher locally, for machines that cannot download pretrained weights."""

    epochs: PosInt = 30
    batch_size: PosInt = 128
    lr: Annotated[float, Field(gt=0.0)] = 0.1
    """Base SGD learning rate for a batch of 256 (scaled linearly)."""
    weight_decay: NonNegFloat = 5e-4
    warmup_epochs: Annotated[int, Field(ge=0)] = 1
    shuffle: Annotated[int, Field(ge=0)] = 4096
    """Seeded shuffle buffer (samples per DataLoader worker), as student.shuffle."""
    aug: dict[str, Any] = {}
    """Changes to the ``aug`` section for fitting only (e.g. ``{mix_prob: 0}``): a teacher is trained with
    its own recipe, as DeiT's pretrained RegNet was, and then labels the student's DeiT views."""
    output: Location = "data/teacher.pt"


class TeacherConfig(Strict):
    model: str = "resnet18"
    pretrained: bool = False
    checkpoint: Location | None = None
    small_stem: bool = False
    """3x3 stride-1 stem without max-pool, for 28 to 64 px inputs."""
    epochs: Annotated[int, Field(ge=1, le=10000)] = 4
    """E: how many augmented epochs are stored; student epoch t replays stored epoch t mod E."""
    topk: Annotated[int, Field(ge=1)] = 10
    batch_size: PosInt = 256
    workers: Annotated[int, Field(ge=0)] = 0
    claim_ttl: Annotated[float, Field(gt=0.0)] = 120.0
    """Seconds a writer's claim on a unit lasts without a heartbeat (renewed every ttl / 4 while it lives):
    how long a unit of a writer that died waits before another writer takes it over."""
    fit: TeacherFitConfig = Field(default_factory=TeacherFitConfig)


class StoreConfig(Strict):
    path: Location = "data/logits.zarr"
    codec: Literal[CODECS] = "zstd"  # type: ignore[valid-type]
    level: Annotated[int, Field(ge=0)] = 3
    """zstd: 0 to 22; gzip and blosc-lz4: 0 to 9."""

    @model_validator(mode="after")
    def _level(self) -> StoreConfig:
        lo, hi = CODEC_LEVELS[self.codec]
        if not lo <= self.level <= hi:
            raise ValueError(f"store.level {self.level} is out of range for {self.codec} ({lo} to {hi})")
        return self


class StudentConfig(Strict):
    model: str = "deit_tiny_distilled_patch16_224"
    patch_size: PosInt | None = None
    embed_dim: PosInt | None = None
    depth: PosInt | None = None
    num_heads: PosInt | None = None
    drop_path: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    distillation: Literal["none", "soft", "hard"] = "hard"
    token: Literal["dist", "class"] = "dist"
    """dist: teacher term on the distillation head (DeiT⚗); class: both terms on the class head."""
    alpha: Prob = 0.5
    tau: Annotated[float, Field(gt=0.0)] = 1.0
    teacher_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    teacher_mode: Literal["offline", "online"] = "offline"
    epochs: PosInt = 300
    batch_size: PosInt = 64
    """Per-rank batch size; lr scales with the global batch."""
    workers: Annotated[int, Field(ge=0)] = 0
    lr: Annotated[float, Field(gt=0.0)] = 5e-4
    """Base learning rate for a global batch of 512."""
    min_lr: NonNegFloat = 1e-5
    warmup_lr: NonNegFloat = 1e-6
    warmup_epochs: Annotated[int, Field(ge=0)] = 5
    weight_decay: NonNegFloat = 0.05
    clip_grad: Annotated[float, Field(gt=0.0)] | None = None
    ema: bool = False
    ema_decay: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.99996
    eval_every: PosInt = 1
    """Evaluate on val every N epochs (and always after the last)."""
    shuffle: Annotated[int, Field(ge=0)] = 2048
    """Seeded shuffle buffer (samples per worker); 0 streams the epoch's windows in order."""
    elastic: Literal["keep_global_batch", "rescale_lr"] = "keep_global_batch"
    """Resuming on another number of ranks: keep the checkpoint's global batch (the per-rank batch becomes
    global / ranks) or keep student.batch_size per rank and scale the lr with the new global batch."""
    output: Location = "runs/student"
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    """Seeds the student alone: its initialisation, drop path and the order it meets the views, not the views
    (the store pins those to the top-level seed), so seeds of a sweep share one store; null: the top-level seed."""


class EvaluateConfig(Strict):
    batch_size: PosInt = 256
    students: list[Location] = []
    """Student output folders to evaluate (each named by its folder, without a 'student-' prefix)."""
    throughput_seconds: Annotated[float, Field(gt=0.0)] = 2.0
    """Timed inference per model for the throughput column."""
    output: Location = "runs/eval"


class SlurmConfig(Strict):
    """``distill submit``: the SLURM resources of a submitted stage (through submitit); its flags override these.

    The student runs as one job of ``nodes`` x ``tasks_per_node`` ranks; the teacher as a job array of ``writers``
    one-GPU tasks that fill one store together; every other stage as one process."""

    nodes: PosInt = 1
    gpus_per_node: Annotated[int, Field(ge=0)] = 8
    tasks_per_node: PosInt | None = None
    """Ranks per node of the student's job (default: one per GPU, 1 without GPUs)."""
    writers: PosInt | None = None
    """The teacher's job array: this many one-GPU writers (default: nodes x tasks_per_node)."""
    cpus_per_task: PosInt = 10
    mem_gb: PosInt | None = None
    """Memory of a node (GB): the student's job asks for it per node, a one-process job for one rank's share."""
    time: PosInt = 2800
    """Minutes a job may run (the official DeiT default); a job that reaches it is requeued and resumes."""
    partition: str | None = None
    constraint: str | None = None
    account: str | None = None
    qos: str | None = None
    max_timeouts: Annotated[int, Field(ge=0)] = 3
    """Requeues after a timeout before a job gives up (a preemption always requeues)."""
    setup: list[str] = []
    """Shell lines run in the job before the stage, e.g. ``[module load cuda, source .venv/bin/activate]``."""
    additional: dict[str, Any] = {}
    """Other sbatch options by name, e.g. ``{mail-type: END, exclusive: true}``."""
    logs: str = "runs/slurm/%j"
    """Folder of the jobs' logs and submitit's files (a shared filesystem's path; %j: the job id)."""

    @model_validator(mode="after")
    def _local_logs(self) -> SlurmConfig:
        if "://" in self.logs:
            raise ValueError(f"slurm.logs must be a path on a filesystem the nodes share, not a URL, got {self.logs!r}")
        return self


class Config(Strict):
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    storage_options: dict[str, dict[str, Any]] = {}
    """Per URL scheme, the options of its fsspec filesystem, e.g. ``{s3: {endpoint_url: http://..., anon: false}}``
    (credentials are better left to the filesystem's environment variables or profiles)."""
    data: DataConfig
    aug: AugConfig = Field(default_factory=AugConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _fit_aug(self) -> Config:
        self.fit_aug()
        return self

    def fit_aug(self) -> AugConfig:
        """The augmentation teacher-fit trains with: ``aug`` with ``teacher.fit.aug`` applied."""
        try:
            return AugConfig.model_validate({**self.aug.model_dump(), **self.teacher.fit.aug})
        except ValidationError as e:
            errors = "; ".join(
                f"teacher.fit.aug.{'.'.join(str(p) for p in err['loc']) or '(aug)'}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(errors) from None

    def section_hash(self, *names: str) -> str:
        """Stable sha256 over the named sections (all when none), for provenance."""
        dumped = self.model_dump(mode="json")
        if names:
            dumped = {n: dumped[n] for n in names}
        return canonical_hash(dumped)


def canonical_hash(obj: Any) -> str:
    """sha256 of canonical JSON: key order and whitespace do not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _format_validation(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        elif isinstance(got, dict):
            lines.append(f"  {loc}: {msg}")
        else:
            lines.append(f"  {loc}: {msg} (got {got!r})")
    return "\n".join(lines)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set student.epochs=10")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from e


def overridden(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``cfg`` with ``a.b=value`` overrides applied (as ``-s`` does), validated again."""
    raw = cfg.model_dump(mode="json")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation("overrides", e)) from None


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override (``a.b=value``, YAML-typed) and validate a config; errors name file, key and value."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation(str(path), e)) from None
