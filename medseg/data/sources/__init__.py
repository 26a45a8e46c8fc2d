"""Dataset readers, one per on-disk format, each yielding ``Case`` records; ``open_source`` picks one."""
from __future__ import annotations

import os
from pathlib import Path

from medseg.data.sources.base import Case, Source
from medseg.data.sources.folders2d import Folders2DSource
from medseg.data.sources.kaggle_evalseg import KaggleEvalsegSource, find_tasks
from medseg.data.sources.msd import MSDSource
from medseg.errors import ConfigError, DataError

FORMATS = ("kaggle", "msd", "folders2d")

__all__ = ["Case", "Source", "FORMATS", "KaggleEvalsegSource", "MSDSource", "Folders2DSource",
           "detect_format", "open_source", "open_source_from_config"]


def detect_format(path: str | os.PathLike, image_dir: str = "images", mask_dir: str = "masks") -> str:
    """Which reader fits ``path``: dataset.json -> msd; metadata.json or Task*/metadata.json -> kaggle;
    <image_dir>/ and <mask_dir>/ -> folders2d."""
    path = Path(path)
    if (path / "dataset.json").is_file():
        return "msd"
    if (path / "metadata.json").is_file() or any((t / "metadata.json").is_file() for t in find_tasks(path)):
        return "kaggle"
    if (path / image_dir).is_dir() and (path / mask_dir).is_dir():
        return "folders2d"
    raise DataError(
        f"{path}: unknown dataset layout: no dataset.json (msd), no metadata.json or Task*/metadata.json (kaggle), "
        f"no {image_dir}/ + {mask_dir}/ folders (folders2d)"
    )


def open_source(
    format: str,
    path: str | os.PathLike,
    *,
    task: str | None = None,
    allow_missing: bool = False,
    image_dir: str = "images",
    mask_dir: str = "masks",
    image_suffix: str = "",
    mask_suffix: str = "",
    labels: dict[int, str] | None = None,
    mask_threshold: float | None = None,
    channels: str = "gray",
    warn_skipped: bool = True,
) -> Source:
    """The reader for ``format`` ("kaggle", "msd", "folders2d" or "auto") opened on ``path``.

    ``labels`` names the mask values of a 2D folder dataset (kaggle and msd read theirs from their metadata);
    ``mask_threshold`` binarises its greyscale masks, ``channels`` (auto, rgb, gray) reads its images in colour or
    grey (volumes: always 1 channel). ``warn_skipped``: log the unpaired cases ``allow_missing`` skips (the audit,
    which lists them itself, passes False).
    """
    if format == "auto":
        format = detect_format(path, image_dir, mask_dir)
    if mask_threshold is not None and format in ("kaggle", "msd"):
        raise DataError(f"{path}: dataset.mask_threshold binarises 2D mask images; this is a {format} dataset of label "
                        "volumes (unset dataset.mask_threshold)")
    if channels == "rgb" and format in ("kaggle", "msd"):
        raise ConfigError(f"dataset.channels: rgb reads colour 2D images; {path} is a {format} dataset of volumes, "
                          "which have 1 channel (use auto or gray)")
    if format == "kaggle":
        return KaggleEvalsegSource(path, task=task, allow_missing=allow_missing, warn_skipped=warn_skipped)
    if format == "msd":
        return MSDSource(path, allow_missing=allow_missing, warn_skipped=warn_skipped)
    if format == "folders2d":
        return Folders2DSource(path, image_dir=image_dir, mask_dir=mask_dir, image_suffix=image_suffix,
                               mask_suffix=mask_suffix, labels=labels, allow_missing=allow_missing,
                               mask_threshold=mask_threshold, channels=channels, warn_skipped=warn_skipped)
    raise ValueError(f"data.format: unknown format {format!r}; allowed: {', '.join(FORMATS + ('auto',))}")


def open_source_from_config(dataset_cfg, *, warn_skipped: bool = True) -> Source:
    """``open_source`` with the fields of the ``dataset`` config section (and ``warn_skipped``).

    Its ``labels`` (foreground values to learn) become the label set of a 2D folder dataset, whose files
    carry no label names.
    """
    c = dataset_cfg
    labels = {0: "background", **{int(v): f"label {v}" for v in c.labels}} if c.labels else None
    return open_source(c.format, c.path, task=c.task, allow_missing=c.allow_missing, image_dir=c.image_dir,
                       mask_dir=c.mask_dir, image_suffix=c.image_suffix, mask_suffix=c.mask_suffix, labels=labels,
                       mask_threshold=getattr(c, "mask_threshold", None), channels=getattr(c, "channels", "gray"),
                       warn_skipped=warn_skipped)
