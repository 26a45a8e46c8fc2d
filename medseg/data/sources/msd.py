"""Reader for the Medical Segmentation Decathlon and nnU-Net raw layouts.

    <root>/dataset.json
           imagesTr/<id>.nii.gz         (MSD)   or  imagesTr/<id>_0000.nii.gz  (nnU-Net v2, channel 0)
           labelsTr/<id>.nii.gz
Only single-channel datasets are read: a Case holds one image volume.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from medseg.data.sources import common
from medseg.data.sources.base import Case
from medseg.data.sources.common import PairedFiles
from medseg.errors import DataError, ShapeMismatchError

_CHANNEL = re.compile(r"^(?P<id>.+)_(?P<channel>\d{4})$")


def _nifti_files(folder: Path) -> dict[str, Path]:
    """stem -> path for the NIfTI files of ``folder``."""
    return common.files_by_key(folder, lambda path: common.strip_suffix(path.name, common.NIFTI_SUFFIXES),
                               "missing (the MSD / nnU-Net layout has imagesTr/ and labelsTr/)")


class MSDSource(PairedFiles):
    """A Decathlon (MSD) task folder or an nnU-Net v2 raw dataset folder; labels and modality from dataset.json.
    ``allow_missing`` and ``warn_skipped`` as for ``KaggleEvalsegSource``."""

    channels = 1  # one image per case (``_0000``): a single modality

    def __init__(self, path: str | os.PathLike, allow_missing: bool = False, *, warn_skipped: bool = True) -> None:
        self.root = Path(path)
        meta_path = self.root / "dataset.json"
        meta = common.read_json_object(meta_path, "an MSD / nnU-Net dataset folder has a dataset.json")
        self.labels: dict[int, str] = common.parse_labels(meta.get("labels"), source=str(meta_path))
        channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}  # v2 or MSD
        if not isinstance(channels, dict) or len(channels) != 1:
            raise DataError(f"{meta_path}: only single-channel datasets are supported, channels: {channels!r}")
        self.modality: str = str(next(iter(channels.values())))
        self.name: str = str(meta.get("name", self.root.name))
        self.allow_missing, self.warn_skipped = allow_missing, warn_skipped
        self._pairs: dict[str, tuple[Path, Path]] | None = None

    def _index(self) -> dict[str, tuple[Path, Path]]:
        """case id -> (image, label) paths; validates the pairing once."""
        if self._pairs is not None:
            return self._pairs
        labels = _nifti_files(self.root / "labelsTr")
        images: dict[str, Path] = {}
        for stem, path in _nifti_files(self.root / "imagesTr").items():
            match = _CHANNEL.match(stem)
            # nnU-Net v2 names images <id>_0000; an MSD id may itself end in digits, so the label decides.
            cid = match["id"] if match and stem not in labels and match["id"] in labels else stem
            if cid != stem and match["channel"] != "0000":
                raise DataError(f"{path}: case {cid}: channel {match['channel']}; "
                                "only single-channel data is supported")
            if cid in images:
                raise DataError(f"{self.root / 'imagesTr'}: case {cid}: both {images[cid].name} and {path.name}")
            images[cid] = path
        ids = common.paired_ids(self.root, {c: f"imagesTr/{p.name}" for c, p in images.items()},
                         {c: f"labelsTr/{p.name}" for c, p in labels.items()}, "images without label",
                         "labels without image", allow_missing=self.allow_missing,
                         warn_skipped=self.warn_skipped)
        pairs = {cid: (images[cid], labels[cid]) for cid in ids}
        self._pairs = pairs
        return pairs

    def fingerprint(self) -> str:
        """Hash of dataset.json and the paired files' names, sizes and mtimes (nothing decompressed)."""
        stamps = [common.file_stamp(self.root / "dataset.json", self.root)]
        stamps += [common.file_stamp(p, self.root) for pair in self._index().values() for p in pair]
        return common.fingerprint_of(stamps)

    def ground_truth_ids(self) -> list[str]:
        """Ids of every file in labelsTr/, image or not."""
        return sorted(_nifti_files(self.root / "labelsTr"))

    def _read_label(self, path: Path, case_id: str) -> np.ndarray:
        where = f"{path} (case {case_id})"
        label = common.to_label(common.load_nifti(path, source=where).array, source=where)
        common.check_labels(label, self.labels, where=where)
        return label

    def load_label(self, case_id: str) -> np.ndarray:
        """labelsTr/<id>.nii[.gz] of any case, image or not: uint8 (X, Y, Z)."""
        path = _nifti_files(self.root / "labelsTr").get(case_id)
        if path is None:
            raise DataError(f"{self.root / 'labelsTr'}: no label for case {case_id!r}")
        return self._read_label(path, case_id)

    def shape(self, case_id: str) -> tuple[int, int, int]:
        """(X, Y, Z) of the case's image from its NIfTI header (no voxel decoded)."""
        image_path = self._pair(case_id)[0]
        return common.nifti_shape(image_path, source=f"{image_path} (case {case_id})")

    def load(self, case_id: str) -> Case:
        """Decode one case: image float32 (X, Y, Z), label uint8 (X, Y, Z), spacing from the image header."""
        image_path, label_path = self._pair(case_id)
        label = self._read_label(label_path, case_id)
        where = f"{image_path} (case {case_id})"
        nii = common.load_nifti(image_path, source=where)
        image = common.to_image(nii.array, source=where)
        if image.shape != label.shape:
            raise ShapeMismatchError(f"{image_path} vs {label_path} (case {case_id}): image shape {image.shape} "
                                     f"!= label shape {label.shape}")
        return Case(
            case_id=case_id,
            image=image,
            label=label,
            spacing=common.spacing_of(nii.zooms),
            source=str(image_path),
            affine=nii.affine,
            meta={"label_file": str(label_path)},
        )

    def __iter__(self) -> Iterator[Case]:
        for case_id in self.case_ids():
            yield self.load(case_id)
