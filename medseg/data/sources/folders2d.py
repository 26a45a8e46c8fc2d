"""Reader for 2D image/mask folder pairs (PNG, JPEG, TIFF, GIF, BMP), e.g. images/case1.png + masks/case1_mask.png.

Images are paired with masks by stem after removing ``image_suffix`` / ``mask_suffix``: regular expressions
matched at the end of the stem ("_mask", "_seg(mentation)?"). Each pair is a Case of depth 1.

Masks: palette and grayscale values are label values. A mask whose values lie within {0, 255} with 255
present (the usual black/white export) is binarised to {0, 1}, unless 255 is itself a declared label.
With ``mask_threshold`` (dataset.mask_threshold) masks are greyscale instead: value >= threshold -> 1, else 0
(JPEG masks: compression leaves values between 0 and 255 along the edges). Without it, such a mask is an
unknown-label error that says so. Colour masks (RGB with differing channels) are refused either way: their
colours are neither label values nor grey levels.

Images: ``channels`` (dataset.channels) "gray" reduces colour to luma (rows, cols, 1); "rgb" keeps it, and a case's
image is then (rows, cols, 1, 3) (a greyscale file among colour ones repeated into the three channels); "auto" is
"rgb" when the images are colour (``COLOUR_SAMPLE`` of them, spread over the cases, decoded to tell), else "gray".
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medseg.data.sources.base import Case
from medseg.data.sources.common import (
    PairedFiles,
    check_finite,
    check_labels,
    file_stamp,
    files_by_key,
    fingerprint_of,
    is_label_array,
    one_line,
    paired_ids,
    to_label,
)
from medseg.errors import BadLabelError, ConfigError, CorruptFileError, DataError, ShapeMismatchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
DEFAULT_LABELS = {0: "background", 1: "foreground"}
THRESHOLD_HINT = "set dataset.mask_threshold: 128"
# A mask "looks binary but compressed" when this share of its pixels is near 0 or near 255 (JPEG ringing
# only touches the edges of the objects) and some are near 255.
NEAR_BINARY_SHARE = 0.9
NEAR_BINARY_MARGIN = 32
# Pillow modes whose pixels are already single numbers (no colour to reduce).
_GRAY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's convert("L")
CHANNEL_MODES = ("auto", "rgb", "gray")
# dataset.channels auto: an image is colour when more than COLOUR_SHARE of its pixels have channels more than
# COLOUR_SPREAD grey levels (of 255) apart: a grey picture saved as RGB (JPEG chroma noise: 1-3 levels) is not.
COLOUR_SAMPLE = 16
COLOUR_SPREAD = 16
COLOUR_SHARE = 0.001


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """The Pillow image of ``path``, opened lazily (its header read); CorruptFileError when it cannot be read, or
    holds more than ``Image.MAX_IMAGE_PIXELS`` pixels (Pillow only warns below twice that: a decompression bomb)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            yield img
    except (MemoryError, DataError):
        raise
    except Exception as err:  # UnidentifiedImageError, truncated data, decompression bomb: all "unreadable"
        raise CorruptFileError(f"{path}: unreadable image ({type(err).__name__}: {one_line(err)})") from None


def _open(path: Path):
    """Decoded Pillow image (single frame); DataError on unreadable or multi-frame files."""
    with _opened(path) as img:
        frames = getattr(img, "n_frames", 1)
        img.load()
        loaded = img.copy()  # pixel data that outlives the closed file
    if frames > 1:
        raise DataError(f"{path}: {frames} frames; only single-frame images are supported")
    return loaded


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Image file -> float32 (rows, cols, 1); colour is reduced to luma, 16-bit and float values kept. NaN or
    infinite values (a float TIFF) are a NonFiniteImageError."""
    img = _open(Path(path))
    if img.mode in _GRAY_MODES:
        gray = np.asarray(img, dtype=np.float32)
        check_finite(gray, source=str(path))
    elif img.mode in ("1", "LA", "La"):
        gray = np.asarray(img.convert("L"), dtype=np.float32)
    else:  # RGB, RGBA, P, CMYK, YCbCr...
        gray = np.asarray(img.convert("RGB"), dtype=np.float32) @ _LUMA
    return gray[..., None]


def read_colour(path: str | os.PathLike) -> np.ndarray:
    """Image file -> float32 (rows, cols, 3) RGB (palette, alpha, CMYK... converted), or (rows, cols, 1) as
    ``read_gray`` for a greyscale file (modes L, I, F, 1, LA: one channel)."""
    img = _open(Path(path))
    if img.mode in _GRAY_MODES or img.mode in ("1", "LA", "La"):
        return read_gray(path)
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def is_colour(path: str | os.PathLike) -> bool:
    """Whether the image holds colour: a colour mode whose channels differ (``COLOUR_SPREAD``, ``COLOUR_SHARE``)."""
    with _opened(Path(path)) as img:
        if img.mode in _GRAY_MODES or img.mode in ("1", "LA", "La"):
            return False
        rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return np.count_nonzero(spread > COLOUR_SPREAD) > COLOUR_SHARE * spread.size


def _mask_values(img, where: str) -> np.ndarray:
    """The single-valued pixels of a mask image: grey levels, or palette indices of a "P" image."""
    if img.mode in _GRAY_MODES or img.mode in ("1", "P"):
        return np.asarray(img)  # for "P", palette indices are the label values (PASCAL VOC style)
    rgb = np.asarray(img.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise BadLabelError(f"{where}: colour mask (mode {img.mode}, channels differ): its colours are not label "
                            "values; save masks as greyscale or palette label values (or greyscale 0/255 with "
                            "dataset.mask_threshold)")
    return rgb[..., 0]


def _grey_levels(img, where: str) -> np.ndarray:
    """The grey level of every pixel, for thresholding (a palette image through its palette's colours)."""
    if img.mode in _GRAY_MODES:
        return np.asarray(img)
    if img.mode == "1":
        return np.asarray(img.convert("L"))
    return _mask_values(img.convert("RGB") if img.mode == "P" else img, where)


def read_mask(path: str | os.PathLike, labels: dict[int, str] | None = None, *, threshold: float | None = None,
              case_id: str | None = None) -> np.ndarray:
    """Mask file -> uint8 (rows, cols, 1) label values; {0, 255} masks become {0, 1} (see module doc).

    ``threshold``: grey levels >= threshold become 1, the rest 0. ``case_id`` is named in error messages.
    """
    path = Path(path)
    where = f"{path} (case {case_id})" if case_id is not None else str(path)
    img = _open(path)
    if threshold is not None:
        grey = _grey_levels(img, where)
        if grey.dtype.kind == "f" and not np.all(np.isfinite(grey)):
            raise BadLabelError(f"{where}: NaN or infinite mask values cannot be thresholded "
                                f"(dataset.mask_threshold {threshold:g}); save the mask as integer grey levels")
        if 0 < grey.max() < threshold and set(np.unique(grey).tolist()) <= {0, 1}:  # every foreground pixel lost
            raise BadLabelError(f"{where}: the mask holds label values 0 and 1, all below dataset.mask_threshold "
                                f"{threshold:g}: it is a label mask, not a greyscale one; unset dataset.mask_threshold")
        return (grey >= threshold).astype(np.uint8)[..., None]
    values = _mask_values(img, where)
    if not is_label_array(values):
        hint = " or set dataset.mask_threshold to binarise a greyscale mask" if values.dtype.kind in "iuf" else ""
        raise BadLabelError(f"{where}: mask values are not integers in 0..255 (mode {img.mode}, dtype {values.dtype}, "
                            f"range {_value_range(values)}): save label values 0..255{hint}")
    mask = to_label(values, source=where)
    present = set(np.unique(mask).tolist())
    if 255 in present and present <= {0, 255} and 255 not in (labels or {}):
        mask = (mask == 255).astype(np.uint8)
    return mask[..., None]


def _value_range(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return f"{finite.min():g}..{finite.max():g}" if finite.size else "no finite value"


def threshold_hint(label: np.ndarray) -> str:
    """The fix to append to an unknown-label error when ``label`` looks like a compressed binary mask (mostly 0
    and ~255 with a few values in between, as JPEG leaves them), else ""."""
    values = np.asarray(label).ravel()
    high = values >= 255 - NEAR_BINARY_MARGIN
    near = np.count_nonzero(values < NEAR_BINARY_MARGIN) + np.count_nonzero(high)
    if not high.any() or near < NEAR_BINARY_SHARE * values.size:
        return ""
    return (f"; it looks like a compressed binary mask ({100 * near / values.size:.1f}% of pixels near 0 or 255, the "
            f"rest in between, as JPEG leaves them): {THRESHOLD_HINT}")


def _compile(pattern: str, what: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(f"(?:{pattern})$")
    except re.error as err:
        raise DataError(f"{what}: invalid regular expression {pattern!r} ({err})") from None


def _by_key(folder: Path, suffix: re.Pattern | None) -> dict[str, Path]:
    """case key -> file: the stem with the suffix pattern removed from its end (stem kept when it does not match)."""
    def key_of(path: Path) -> str | None:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        return suffix.sub("", path.stem, count=1) if suffix else path.stem

    return files_by_key(folder, key_of)


class Folders2DSource(PairedFiles):
    """Pairs ``<path>/<image_dir>/*`` with ``<path>/<mask_dir>/*`` by stem; each pair is a depth-1 Case.
    ``allow_missing`` and ``warn_skipped`` as for ``KaggleEvalsegSource``."""

    def __init__(
        self,
        path: str | os.PathLike,
        image_dir: str = "images",
        mask_dir: str = "masks",
        image_suffix: str = "",
        mask_suffix: str = "",
        labels: dict[int, str] | None = None,
        allow_missing: bool = False,
        mask_threshold: float | None = None,
        channels: str = "gray",
        *,
        warn_skipped: bool = True,
    ) -> None:
        self.root = Path(path)
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self._image_re = _compile(image_suffix, "image_suffix")
        self._mask_re = _compile(mask_suffix, "mask_suffix")
        self.labels: dict[int, str] = {int(k): str(v) for k, v in (labels or DEFAULT_LABELS).items()}
        self.modality = "image"  # not CT: intensities are percentile-normalised downstream
        self.allow_missing, self.warn_skipped = allow_missing, warn_skipped
        self.mask_threshold = mask_threshold
        if channels not in CHANNEL_MODES:
            raise ConfigError(f"dataset.channels: {channels!r}; allowed: {', '.join(CHANNEL_MODES)}")
        self.channel_mode = channels
        self._channels: int | None = None
        self._pairs: dict[str, tuple[Path, Path]] | None = None

    @property
    def channels(self) -> int:
        """Channels of every case's image: 3 (colour kept) or 1 (luma), from ``channel_mode`` (module doc); rgb on
        greyscale images is a ConfigError."""
        if self._channels is None:
            self._channels = 1 if self.channel_mode == "gray" else self._resolve_colour()
        return self._channels

    def _resolve_colour(self) -> int:
        pairs = self._index()
        ids = sorted(pairs)
        step = max(1, len(ids) / COLOUR_SAMPLE)
        sample = list(dict.fromkeys(ids[int(i * step)] for i in range(min(COLOUR_SAMPLE, len(ids)))))
        looked = 0
        for cid in sample:
            try:
                colour = is_colour(pairs[cid][0])
            except DataError:  # unreadable: not a clue; its case's load refuses it, naming the case
                continue
            if colour:
                return 3
            looked += 1
        if self.channel_mode == "rgb" and looked:
            example = pairs[sample[0]][0] if sample else self.root / self.image_dir
            raise ConfigError(f"dataset.channels: rgb, but the images of {self.root / self.image_dir} are greyscale "
                              f"({looked} looked at, e.g. {example}): use auto or gray")
        return 3 if self.channel_mode == "rgb" else 1

    def _index(self) -> dict[str, tuple[Path, Path]]:
        if self._pairs is not None:
            return self._pairs
        images = _by_key(self.root / self.image_dir, self._image_re)
        masks = _by_key(self.root / self.mask_dir, self._mask_re)
        ids = paired_ids(self.root, {k: f"{self.image_dir}/{p.name}" for k, p in images.items()},
                         {k: f"{self.mask_dir}/{p.name}" for k, p in masks.items()}, "images without mask",
                         "masks without image", allow_missing=self.allow_missing, warn_skipped=self.warn_skipped,
                         hint=f" (image_suffix={self.image_suffix!r}, mask_suffix={self.mask_suffix!r})")
        pairs = {k: (images[k], masks[k]) for k in ids}
        self._pairs = pairs
        return pairs

    def fingerprint(self) -> str:
        """Hash of the paired files' names, sizes and mtimes, and the pairing settings."""
        stamps = [file_stamp(p, self.root) for pair in self._index().values() for p in pair]
        settings = {"image_suffix": self.image_suffix, "mask_suffix": self.mask_suffix,
                    "labels": {str(k): v for k, v in sorted(self.labels.items())}}
        if self.mask_threshold is not None:  # only when set: the caches of datasets read without it keep their folder
            settings["mask_threshold"] = self.mask_threshold
        return fingerprint_of(stamps, settings)

    def ground_truth_ids(self) -> list[str]:
        """Keys of every mask, image or not."""
        return sorted(_by_key(self.root / self.mask_dir, self._mask_re))

    def _read_label(self, path: Path, case_id: str) -> np.ndarray:
        label = read_mask(path, self.labels, threshold=self.mask_threshold, case_id=case_id)
        hint = threshold_hint(label) if self.mask_threshold is None else ""
        check_labels(label, self.labels, where=f"{path} (case {case_id})", hint=hint)
        return label

    def load_label(self, case_id: str) -> np.ndarray:
        """The mask of any case, image or not: uint8 (rows, cols, 1)."""
        path = _by_key(self.root / self.mask_dir, self._mask_re).get(case_id)
        if path is None:
            raise DataError(f"{self.root / self.mask_dir}: no mask for case {case_id!r}")
        return self._read_label(path, case_id)

    def shape(self, case_id: str) -> tuple[int, int, int]:
        """(rows, cols, 1) of the case's image from its file header (no pixel decoded)."""
        with _opened(self._pair(case_id)[0]) as img:
            cols, rows = img.size
        return rows, cols, 1

    def load(self, case_id: str) -> Case:
        """image float32 (rows, cols, 1) grayscale or (rows, cols, 1, 3) colour (``channels``), label uint8
        (rows, cols, 1), spacing (1, 1, 1)."""
        image_path, mask_path = self._pair(case_id)
        if self.channels == 1:
            image = read_gray(image_path)
        else:
            colour = read_colour(image_path)
            image = np.repeat(colour, 3, axis=-1)[:, :, None, :] if colour.shape[-1] == 1 else colour[:, :, None, :]
        label = self._read_label(mask_path, case_id)
        if image.shape[:3] != label.shape:
            raise ShapeMismatchError(f"{image_path} vs {mask_path} (case {case_id}): image {image.shape[:2]} "
                                     f"!= mask {label.shape[:2]}")
        return Case(case_id=case_id, image=image, label=label, spacing=(1.0, 1.0, 1.0),
                    source=str(image_path), meta={"mask_file": str(mask_path)})

    def __iter__(self) -> Iterator[Case]:
        for case_id in self.case_ids():
            yield self.load(case_id)
