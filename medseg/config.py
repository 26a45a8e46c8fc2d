"""The typed config tree: YAML + ``--set key=value`` overrides -> validated, resolved ``Config``.

Unknown keys are errors naming their dotted path; every error is one line (``ConfigError``).
Relative paths are resolved against the working directory at load time, so the resolved config holds
absolute paths and stays valid in Ray trials, which run in another working directory.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from medseg.errors import ConfigError
from medseg.io_utils import absolute_path, stable_hash


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _file_name(value: str) -> str:
    # a NUL byte is no path the OS takes (resolving it raises); a line break would split the errors naming the file
    if "\x00" in value or (value and value.splitlines() != [value]):
        raise ValueError(f"{value!r} is not a usable path (NUL byte or line break)")
    return value


PathText = Annotated[str, AfterValidator(_file_name)]  # a file or folder name of a config or search space


class Window(_Strict):
    """CT intensity window in Hounsfield units: [level - width/2, level + width/2] -> [0, 1]."""

    level: float = 60.0
    width: float = Field(400.0, gt=0)


class _OmitUnset(_Strict):
    """Keys added after configs were first hashed (``_omit_unset``) are left out of every dump while at their default
    (None, or the value that does what configs did before the key existed), so the config hash, the split settings
    and their hashes of existing configs stay the same."""

    _omit_unset: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict[str, Any]:
        data = handler(self)
        if not isinstance(data, dict):
            return data
        fields = type(self).model_fields
        return {k: v for k, v in data.items() if not (k in self._omit_unset and getattr(self, k) == fields[k].default)}


class SplitConfig(_OmitUnset):
    method: Literal["ordered", "stable"] = Field(
        "ordered", description="stable: a group's side depends only on a hash of (seed, group) against the fractions, "
        "so adding cases never moves an existing one (for data that grows); ordered: each stratum shuffled and cut "
        "at the exact fractions, redrawn whenever the case list changes")
    seed: int = 0
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    n_folds: int = Field(0, ge=0, description="0: one hold-out split; k >= 2: k-fold cross-validation")
    fold: int = Field(0, ge=0)
    group_regex: str | None = Field(None, description="regex on the case file name; group(1) (or the match) is the "
                                    "patient key")
    groups_file: PathText | None = Field(None, description="CSV 'case_id,group' giving every case its patient group; "
                                    "relative to the config file's folder")
    _omit_unset = ("groups_file", "method")

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if self.n_folds == 1:
            raise ValueError("n_folds must be 0 (hold-out) or >= 2")
        if self.n_folds and self.fold >= self.n_folds:
            raise ValueError(f"fold {self.fold} out of range for n_folds={self.n_folds}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        if self.group_regex is not None:
            try:
                re.compile(self.group_regex)
            except re.error as err:
                raise ValueError(f"group_regex {self.group_regex!r} is not a valid regular expression: {err}") from None
        if self.group_regex is not None and self.groups_file is not None:
            raise ValueError("set group_regex or groups_file, not both (both decide the patient groups)")
        if self.groups_file is not None and not self.groups_file.strip():
            raise ValueError("groups_file is empty; null (no groups file) or the path of a CSV 'case_id,group'")
        return self


class DatasetConfig(_OmitUnset):
    format: Literal["kaggle", "msd", "folders2d", "auto"] = "kaggle"
    path: PathText = "data/synthetic"
    task: str | None = None
    allow_missing: bool = Field(False, description="skip (and list) cases whose image or mask is missing")
    labels: list[int] | None = Field(None, description="foreground label values to learn; null: all non-zero labels "
                                     "of the task")
    window: Window | None = Field(default_factory=Window, description="CT window; null: percentile normalisation")
    percentiles: tuple[float, float] = (0.5, 99.5)
    image_size: int = Field(128, ge=16, le=1024)
    context_slices: int = Field(0, ge=0, le=8, description="2.5D: k neighbouring slices each side as extra channels")
    cache_dir: PathText = "cache"
    cache_workers: int | None = Field(None, ge=1, description="processes that build the cache, one case each at a "
                                      "time; null: the cores available (one process for a small task)")
    split: SplitConfig = Field(default_factory=SplitConfig)
    # 2D folder layout only
    image_dir: str = "images"
    mask_dir: str = "masks"
    image_suffix: str = ""
    mask_suffix: str = ""
    mask_threshold: float | None = Field(None, gt=0, description="binarise greyscale masks: value >= threshold -> "
                                         "label 1 (JPEG masks: 128); null: mask values are label values")
    channels: Literal["auto", "rgb", "gray"] = Field(
        "auto", description="input channels of 2D images: auto (3 when the images are colour, else 1), rgb (3, "
        "colour kept), gray (1, colour reduced to luma); volumes (CT, NIfTI) always have 1")
    _omit_unset = ("mask_threshold", "cache_workers", "channels")

    @field_validator("channels")
    @classmethod
    def _colour_needs_images(cls, v: str, info: ValidationInfo) -> str:
        fmt = info.data.get("format")
        if v == "rgb" and fmt in ("kaggle", "msd"):
            raise ValueError(f"rgb reads colour 2D images; format {fmt!r} reads volumes, which have 1 channel "
                             "(use auto or gray)")
        return v

    @model_validator(mode="after")
    def _check_mask_threshold(self) -> "DatasetConfig":
        if self.mask_threshold is None:
            return self
        if self.format in ("kaggle", "msd"):
            raise ValueError(f"mask_threshold binarises 2D mask images; format {self.format!r} reads label volumes "
                             "(use format folders2d, or auto on an images/ + masks/ folder)")
        if self.labels not in (None, [1]):
            raise ValueError(f"mask_threshold binarises masks to labels {{0, 1}}: labels must be [1] or null, "
                             f"got {self.labels}")
        return self

    @field_validator("percentiles")
    @classmethod
    def _ordered_percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {list(v)}")
        return v

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"image_size must be a multiple of 32 (encoder strides), got {v}")
        return v


class ModelConfig(_Strict):
    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = Field(None, description="null offline; 'imagenet' downloads weights")
    encoder_depth: int = Field(4, ge=3, le=5)
    decoder_channels: list[int] | None = Field(default_factory=lambda: [64, 32, 16, 8])
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra smp.create_model arguments")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        import segmentation_models_pytorch as smp
        from segmentation_models_pytorch.encoders import get_encoder_names

        archs = sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())
        if self.arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
            raise ValueError(f"unknown arch '{self.arch}'; allowed: {archs}")
        if not self.encoder.startswith("tu-") and self.encoder not in get_encoder_names():
            raise ValueError(f"unknown encoder '{self.encoder}'; allowed: {get_encoder_names()} or 'tu-<timm name>'")
        unet = self.arch.lower() in ("unet", "unetplusplus")
        if self.decoder_channels is not None and unet and len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(f"decoder_channels needs {self.encoder_depth} entries (encoder_depth), "
                             f"got {len(self.decoder_channels)}")
        return self


FOCAL_WEIGHT = 0.5  # focal_dice's focal weight before focal_weight existed: bce_weight's default


class LossConfig(_OmitUnset):
    """Loss built from smp.losses. ``bce_dice`` = bce_weight * BCE (CE for multi-class) + dice_weight * Dice;
    ``focal_dice`` = focal_weight * Focal + dice_weight * Dice."""

    name: Literal["bce", "dice", "bce_dice", "focal", "tversky", "focal_dice"] = "bce_dice"
    bce_weight: float = Field(0.5, ge=0)
    dice_weight: float = Field(0.5, ge=0)
    focal_weight: float = Field(FOCAL_WEIGHT, ge=0, description="weight of the focal term of focal_dice")
    focal_gamma: float = Field(2.0, ge=0)
    tversky_alpha: float = Field(0.3, ge=0, le=1, description="weight of false positives")
    tversky_beta: float = Field(0.7, ge=0, le=1, description="weight of false negatives (missed lesions)")
    _omit_unset = ("focal_weight",)

    @model_validator(mode="before")
    @classmethod
    def _focal_weight_from_bce_weight(cls, data: Any, info: ValidationInfo) -> Any:
        """Configs written before focal_weight existed weighted focal_dice's focal term with bce_weight: such a value
        (other than the default both keys share, which changes nothing) moves to focal_weight, with a warning."""
        if not (isinstance(data, dict) and data.get("name") == "focal_dice" and "focal_weight" not in data
                and data.get("bce_weight", FOCAL_WEIGHT) != FOCAL_WEIGHT):
            return data
        source = (info.context or {}).get("source", "<config>")
        warnings.warn(f"{source}: loss.bce_weight weights the focal term of focal_dice under its old name; "
                      "read as loss.focal_weight (rename the key)", FutureWarning, stacklevel=2)
        data = dict(data)
        data["focal_weight"] = data.pop("bce_weight")
        return data


class AugmentConfig(_Strict):
    """One albumentations transform, by class name, with its constructor arguments."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        build_transform(self.name, self.params())  # validated by albumentations itself
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def build_transform(name: str, params: dict[str, Any]):
    """Instantiate ``albumentations.<name>(**params)``; errors name the transform and the bad argument."""
    import warnings

    import albumentations as A

    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        dual = sorted(n for n in dir(A)
                      if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.DualTransform))
        raise ValueError(f"unknown albumentations transform '{name}'; spatial ones include: {', '.join(dual[:40])}, "
                         "...")
    transform_3d = getattr(A, "Transform3D", None)
    if not issubclass(cls, (A.DualTransform, A.ImageOnlyTransform)) or (transform_3d and issubclass(cls, transform_3d)):
        raise ValueError(f"albumentations.{name} is not a 2D image or image+mask transform; the pipeline converts to "
                         "tensors itself")
    try:
        with warnings.catch_warnings():
            # albumentations only warns about an unknown argument and runs on its defaults: a typo ('limt: 15')
            # would silently train with the default range
            warnings.filterwarnings("error", message=r".*Argument\(s\) .* are not valid")
            return cls(**params)
    except Exception as err:  # albumentations validates arguments with pydantic / TypeError
        msg = " ".join(str(err).split())
        raise ValueError(f"albumentations.{name}({params}): {msg[:300]}") from None


class TrainingConfig(_Strict):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(16, ge=1)
    samples_per_epoch: int | None = Field(None, ge=1, description="slices drawn per epoch; null: every training "
                                          "slice once")
    fg_oversample: float = Field(0.0, ge=0, le=1, description="fraction of each epoch drawn from slices with "
                                 "foreground")
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Literal["none", "cosine", "poly"] = "none"
    warmup_epochs: int = Field(0, ge=0)
    poly_power: float = Field(0.9, gt=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="validate and checkpoint an exponential moving "
                                    "average of the weights (per step, warmed up as min(decay, (1+n)/(10+n))); "
                                    "null: the raw weights")
    monitor: str = Field("val/dice", pattern=r"^val/", description="validation metric that picks the best checkpoint "
                         "(and early stopping)")
    monitor_mode: Literal["max", "min"] = "max"
    patience: int | None = Field(None, ge=1, description="stop when the monitored metric has not improved for this "
                                 "many epochs")
    num_workers: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null: torch default (tune sets it "
                                "per trial)")
    seed: int = 0
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training precision, CPU and CUDA: auto = bf16 autocast where the hardware has bf16 "
        "(CPU: AVX-512 BF16 or AMX; detected at start and logged), else float32 on the CPU and fp16 on CUDA; "
        "prediction (validation, eval, infer) stays float32 on the CPU")
    channels_last: bool = Field(True, description="model and batches in the channels_last (NHWC) memory format: "
                                "faster convolutions on the CPU (oneDNN) and on tensor-core GPUs, same float32 maths")
    amp: bool = Field(True, description="the older mixed-precision switch: false = training.precision fp32")
    threshold: float = Field(0.5, gt=0, lt=1, description="sigmoid threshold for binary masks")
    val_overlays: int = Field(4, ge=0, description="validation cases drawn as overlay PNGs")


class OutputConfig(_Strict):
    run_dir: PathText = "runs"
    tracking_uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")
    experiment: str = "medseg"
    run_name: str | None = None


class Config(_Strict):
    name: str = "experiment"
    description: str = ""
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: list[AugmentConfig] = Field(default_factory=list)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        return stable_hash(self.to_dict())


# --------------------------------------------------------------------------------------------- loading


def printable(key: Any) -> str:
    """``key`` as text for a one-line error: its repr when it holds a line break or another unprintable character."""
    return str(key) if str(key).isprintable() else repr(key)


def _format_error(err: ValidationError, source: str) -> ConfigError:
    first = err.errors()[0]
    loc = ".".join(printable(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    extra = f" ({len(err.errors()) - 1} more error(s))" if len(err.errors()) > 1 else ""
    return ConfigError(f"{source}: {loc or '<root>'}: {msg}{extra}")


def parse_override(text: str) -> tuple[str, Any]:
    """``training.lr=3e-4`` -> ("training.lr", 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
    if isinstance(parsed, str):
        # YAML reads "3e-4" as a string (no dot); accept it as the number a user means.
        try:
            parsed = float(parsed) if any(c in parsed.lower() for c in ".e") else parsed
        except ValueError:
            pass
    return key.strip(), parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for key "a.b.c", creating dicts on the way (validation comes later)."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {printable(key)}: '{printable('.'.join(parts[: i + 1]))}' is not a section")
        node = child
    node[parts[-1]] = value


def resolve_paths(cfg: Config, base: Path | None = None, config_dir: Path | None = None) -> Config:
    """Make every path in the config absolute (relative ones are taken from ``base``, default the CWD), except
    ``dataset.split.groups_file``, which ships beside its config: relative to ``config_dir`` (default ``base``)."""
    base = Path(base or os.getcwd())
    cfg.dataset.path = absolute_path(cfg.dataset.path, base)
    cfg.dataset.cache_dir = absolute_path(cfg.dataset.cache_dir, base)
    if cfg.dataset.split.groups_file is not None:
        cfg.dataset.split.groups_file = absolute_path(cfg.dataset.split.groups_file, base / (config_dir or base))
    cfg.output.run_dir = absolute_path(cfg.output.run_dir, base)
    return cfg


def config_from_dict(raw: dict[str, Any], *, source: str = "<config>",
                     overrides: dict[str, Any] | list[str] | None = None, resolve: bool = True,
                     config_dir: str | Path | None = None) -> Config:
    """Validate a raw dict (plus dotted overrides) into a Config; ``config_dir``: the folder of the config file it
    came from (see ``resolve_paths``)."""
    tree = copy.deepcopy(raw) if raw else {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(tree).__name__}")
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in (overrides or []))
    for key, value in items:
        set_dotted(tree, key, value)
    try:
        cfg = Config.model_validate(tree, context={"source": source})
    except ValidationError as err:
        raise _format_error(err, source) from None
    return resolve_paths(cfg, config_dir=Path(config_dir) if config_dir is not None else None) if resolve else cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    return data or {}


def load_config(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load a YAML config file with optional overrides (``["training.lr=3e-4"]`` or a dict of dotted keys)."""
    return config_from_dict(load_yaml(path), source=str(path), overrides=overrides, config_dir=Path(path).parent)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}; lists of dicts (augmentations) are indexed: "augment.0.name"."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        if not tree:
            out[prefix[:-1]] = "[]"
    else:
        out[prefix[:-1]] = tree
    return out
