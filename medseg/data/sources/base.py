"""The one record every reader yields, and the reader interface."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np


@dataclass
class Case:
    """One patient volume with its expert mask.

    image:   float32, shape (X, Y, Z) in NIfTI (i, j, k) order; Hounsfield units for CT, raw values otherwise.
             A 2D image is a volume of depth 1: (rows, cols, 1); a colour one (dataset.channels rgb) has its
             channels last: (rows, cols, 1, 3).
    label:   uint8, the shape of ``image`` (without its channels); integer label values as listed in the source's
             ``labels``.
    spacing: voxel size in mm along (X, Y, Z).
    source:  path of the file the image was read from (for error messages and provenance).
    affine:  4x4 voxel-to-world matrix when the source has one (NIfTI), else None.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    affine: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.case_id, str):
            raise TypeError(f"case id must be a string, got {self.case_id!r}")
        if self.image.shape[:3] != self.label.shape or self.image.ndim not in (3, 4):
            from medseg.errors import ShapeMismatchError

            raise ShapeMismatchError(
                f"{self.source}: case {self.case_id}: image shape {tuple(self.image.shape)} "
                f"!= label shape {tuple(self.label.shape)}"
            )


class Source(Protocol):
    """A dataset on disk. ``case_ids`` is cheap (no volume decoded); ``load`` decodes one case."""

    root: Path
    labels: dict[int, str]
    modality: str  # "CT" (Hounsfield units, windowed) or anything else (percentile-normalised)
    channels: int  # of every case's image: 1, or 3 for colour 2D images (``Case.image`` then has a channel axis)

    def case_ids(self) -> list[str]: ...

    def load(self, case_id: str) -> Case: ...

    def shape(self, case_id: str) -> tuple[int, int, int]:
        """(X, Y, Z) of the case's image as ``load`` returns it, read from the file header without decoding (Z: the
        slices the cache stores; 1 for a 2D image)."""
        ...

    def file_of(self, case_id: str) -> str:
        """A file name identifying the case, used by the grouping regex of the split."""
        ...

    def fingerprint(self) -> str:
        """Hash of what identifies the data (file names, sizes, mtimes): changes when the data changes."""
        ...

    def __iter__(self) -> Iterator[Case]: ...
