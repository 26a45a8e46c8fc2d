"""Reader for 2D image/mask folder pairs (PNG, JPEG, TIFF, GIF, BMP), e.g. images/case1.png + masks/case1_mask.png.

Images are paired with masks by stem after removing ``image_suffix`` / ``mask_suffix``: regular expressions
matched at the end of the stem ("_mask", "_seg(mentation)?"). Each pair is a Case of depth 1.

Masks: palette and grayscale values are label values. A mask whose values lie within {0, 255} with 255
present (the usual black/white export) is binarised to {0, 1}, unless 255 is itself a declared label.
Colour masks (RGB with differing channels) are refused: their colours are not label values.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from medseg.data.sources.base import Case
from medseg.data.sources.common import (
    PairedFiles,
    check_labels,
    file_stamp,
    fingerprint_of,
    is_hidden,
    one_line,
    paired_ids,
    to_label,
)
from medseg.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
DEFAULT_LABELS = {0: "background", 1: "foreground"}
# Pillow modes whose pixels are already single numbers (no colour to reduce).
_GRAY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's convert("L")


def _open(path: Path):
    """Decoded Pillow image (single frame); DataError on unreadable or multi-frame files."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            img.load()
            loaded = img.copy()  # pixel data that outlives the closed file
    except MemoryError:
        raise
    except Exception as err:  # UnidentifiedImageError, truncated data, decompression bomb: all "unreadable"
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {one_line(err)})") from None
    if frames > 1:
        raise DataError(f"{path}: {frames} frames; only single-frame images are supported")
    return loaded


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Image file -> float32 (rows, cols, 1); colour is reduced to luma, 16-bit and float values kept."""
    img = _open(Path(path))
    if img.mode in _GRAY_MODES:
        gray = np.asarray(img, dtype=np.float32)
    elif img.mode in ("1", "LA", "La"):
        gray = np.asarray(img.convert("L"), dtype=np.float32)
    else:  # RGB, RGBA, P, CMYK, YCbCr...
        gray = np.asarray(img.convert("RGB"), dtype=np.float32) @ _LUMA
    return gray[..., None]


def read_mask(path: str | os.PathLike, labels: dict[int, str] | None = None) -> np.ndarray:
    """Mask file -> uint8 (rows, cols, 1) label values; {0, 255} masks become {0, 1} (see module doc)."""
    path = Path(path)
    img = _open(path)
    if img.mode in _GRAY_MODES or img.mode in ("1", "P"):
        values = np.asarray(img)  # for "P", palette indices are the label values (PASCAL VOC style)
    else:
        rgb = np.asarray(img.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"{path}: colour mask (mode {img.mode}); save masks as grayscale or palette label values")
        values = rgb[..., 0]
    mask = to_label(values, source=str(path))
    present = set(np.unique(mask).tolist())
    if 255 in present and present <= {0, 255} and 255 not in (labels or {}):
        mask = (mask == 255).astype(np.uint8)
    return mask[..., None]


def _compile(pattern: str, what: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(f"(?:{pattern})$")
    except re.error as err:
        raise DataError(f"{what}: invalid regular expression {pattern!r} ({err})") from None


def _by_key(folder: Path, suffix: re.Pattern | None) -> dict[str, Path]:
    """case key -> file: the stem with the suffix pattern removed from its end (stem kept when it does not match)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: missing folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if is_hidden(path.name) or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        key = suffix.sub("", path.stem, count=1) if suffix else path.stem
        if key in found:
            raise DataError(f"{folder}: case {key}: both {found[key].name} and {path.name}")
        found[key] = path
    return found


class Folders2DSource(PairedFiles):
    """Pairs ``<path>/<image_dir>/*`` with ``<path>/<mask_dir>/*`` by stem; each pair is a depth-1 Case."""

    def __init__(
        self,
        path: str | os.PathLike,
        image_dir: str = "images",
        mask_dir: str = "masks",
        image_suffix: str = "",
        mask_suffix: str = "",
        labels: dict[int, str] | None = None,
        allow_missing: bool = False,
    ) -> None:
        self.root = Path(path)
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self._image_re = _compile(image_suffix, "image_suffix")
        self._mask_re = _compile(mask_suffix, "mask_suffix")
        self.labels: dict[int, str] = {int(k): str(v) for k, v in (labels or DEFAULT_LABELS).items()}
        self.modality = "image"  # not CT: intensities are percentile-normalised downstream
        self.allow_missing = allow_missing
        self._pairs: dict[str, tuple[Path, Path]] | None = None

    def __repr__(self) -> str:
        return f"Folders2DSource({str(self.root)!r})"

    def _index(self) -> dict[str, tuple[Path, Path]]:
        if self._pairs is not None:
            return self._pairs
        images = _by_key(self.root / self.image_dir, self._image_re)
        masks = _by_key(self.root / self.mask_dir, self._mask_re)
        ids = paired_ids(self.root, {k: f"{self.image_dir}/{p.name}" for k, p in images.items()},
                         {k: f"{self.mask_dir}/{p.name}" for k, p in masks.items()}, "images without mask",
                         "masks without image", allow_missing=self.allow_missing,
                         hint=f" (image_suffix={self.image_suffix!r}, mask_suffix={self.mask_suffix!r})")
        pairs = {k: (images[k], masks[k]) for k in ids}
        self._pairs = pairs
        return pairs

    def fingerprint(self) -> str:
        """Hash of the paired files' names, sizes and mtimes, and the pairing settings."""
        stamps = [file_stamp(p, self.root) for pair in self._index().values() for p in pair]
        settings = {"image_suffix": self.image_suffix, "mask_suffix": self.mask_suffix,
                    "labels": {str(k): v for k, v in sorted(self.labels.items())}}
        return fingerprint_of(stamps, settings)

    def ground_truth_ids(self) -> list[str]:
        """Keys of every mask, image or not."""
        return sorted(_by_key(self.root / self.mask_dir, self._mask_re))

    def _read_label(self, path: Path, case_id: str) -> np.ndarray:
        label = read_mask(path, self.labels)
        check_labels(label, self.labels, where=f"{path} (case {case_id})")
        return label

    def load_label(self, case_id: str) -> np.ndarray:
        """The mask of any case, image or not: uint8 (rows, cols, 1)."""
        path = _by_key(self.root / self.mask_dir, self._mask_re).get(case_id)
        if path is None:
            raise DataError(f"{self.root / self.mask_dir}: no mask for case {case_id!r}")
        return self._read_label(path, case_id)

    def load(self, case_id: str) -> Case:
        """image float32 (rows, cols, 1) grayscale, label uint8 (rows, cols, 1), spacing (1, 1, 1)."""
        image_path, mask_path = self._pair(case_id)
        image = read_gray(image_path)
        label = self._read_label(mask_path, case_id)
        if image.shape != label.shape:
            raise DataError(f"{image_path} vs {mask_path} (case {case_id}): image {image.shape[:2]} "
                            f"!= mask {label.shape[:2]}")
        return Case(case_id=case_id, image=image, label=label, spacing=(1.0, 1.0, 1.0),
                    source=str(image_path), meta={"mask_file": str(mask_path)})

    def __iter__(self) -> Iterator[Case]:
        for case_id in self.case_ids():
            yield self.load(case_id)
