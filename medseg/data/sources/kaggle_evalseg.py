"""Reader for the Kaggle "Medical Image Segmentation" (evalseg) layout; see ../shared/docs/DATASET.md.

    <root>/Task*/metadata.json, CT.zip (bzip2, <id>.nii[.gz] members) or CT/<id>.nii[.gz],
                 GroundTruth/<id>.pkl[.gz], Predictions/<method>/<id>.pkl[.gz]
"""
from __future__ import annotations

import bz2
import contextlib
import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from medseg.data.evalseg_pickle import LabelVolume, read_label_pickle
from medseg.data.sources.base import Case
from medseg.data.sources.common import (
    GZIP_MAGIC,
    NIFTI2_HEADER_BYTES,
    NIFTI_SUFFIXES,
    TRAILING_SLACK,
    NiftiVolume,
    check_labels,
    file_stamp,
    fingerprint_of,
    format_names,
    is_hidden,
    load_nifti,
    nifti_data_end,
    nifti_shape,
    one_line,
    paired_ids,
    parse_labels,
    read_json_object,
    spacing_of,
    strip_suffix,
    to_image,
)
from medseg.errors import CorruptFileError, DataError, ShapeMismatchError

PICKLE_SUFFIXES = (".pkl.gz", ".pkl")
# A CT member inflating more than this many times its compressed size is refused unread: CT volumes (noise, air at
# -1024) compress ~2-10:1 with bzip2; a bomb of zeros ~1,000,000:1.
MAX_MEMBER_RATIO = 1000
HEADER_READ = 1 << 16  # inflated bytes of a member that hold its NIfTI header (a .nii.gz's: gzip framing, 540 bytes)
BZIP2_STEP = 1 << 20  # bzip2 output per step: a block of zeros (~40 bytes compressed) inflates to ~46 MB


@dataclass(frozen=True)
class _CTRef:
    """Where one case's CT lives: a CT.zip member or a file in CT/. ``stamp`` is the CRC or mtime_ns."""

    name: str  # for messages and file_of: "CT.zip:021.nii" or "CT/021.nii.gz"
    member: str | None
    path: Path | None
    size: int
    stamp: int
    packed: int = 0  # compressed size of a CT.zip member


def find_tasks(root: Path) -> list[Path]:
    """Task folders directly under a dataset root (any ``Task*`` directory; names are never assumed)."""
    return sorted(p for p in root.glob("Task*") if p.is_dir())


def _read_metadata(task_dir: Path) -> dict:
    return read_json_object(task_dir / "metadata.json", "every Kaggle evalseg task folder has a metadata.json")


def _select_task(path: Path, task: str | None) -> Path:
    """``path`` is a task folder (has metadata.json) or a root of Task* folders; ``task`` names one."""
    if (path / "metadata.json").is_file():
        if task is not None and task not in (path.name, _read_metadata(path).get("name")):
            raise DataError(f"{path}: is task {path.name!r}, not the requested task {task!r}")
        return path
    if not path.is_dir():
        raise DataError(f"{path}: not a directory")
    tasks = find_tasks(path)
    if not tasks:
        raise DataError(f"{path}: no metadata.json and no Task* folder")
    if task is None:
        if len(tasks) > 1:
            raise DataError(f"{path}: holds several tasks (choose one with task): {', '.join(t.name for t in tasks)}")
        return tasks[0]
    # Folder name first; the metadata name only as a fallback (Task003's metadata calls itself Task04).
    matches = [t for t in tasks if t.name == task] or [
        t for t in tasks if (t / "metadata.json").is_file() and _read_metadata(t).get("name") == task
    ]
    if len(matches) != 1:
        raise DataError(f"{path}: no single task named {task!r}; tasks: {', '.join(t.name for t in tasks)}")
    return matches[0]


def _read_bzip2(zip_path: Path, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The first ``limit + 1`` inflated bytes of a bzip2 member at most, inflated step by step (zipfile inflates each
    read whole: a bomb's gigabytes at once); CRC checked when the member was read to its end."""
    with open(zip_path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        if local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"Bad magic number for file header of {info.filename!r}")
        raw.seek(info.header_offset + 30 + sum(struct.unpack_from("<HH", local, 26)))  # name and extra field
        inflate, out, left = bz2.BZ2Decompressor(), bytearray(), info.compress_size
        while not inflate.eof and len(out) <= limit:
            chunk = b""
            if inflate.needs_input:
                chunk = raw.read(min(1 << 16, left))
                if not chunk:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                left -= len(chunk)
            out += inflate.decompress(chunk, min(BZIP2_STEP, limit + 1 - len(out)))
    if inflate.eof and zlib.crc32(out) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
    return bytes(out)


def _plain_name(name: str, what: str, where: Path) -> str:
    """Refuse ids and method names that could walk out of their folder when joined to a path."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise DataError(f"{where}: invalid {what} {name!r}")
    return name


def _pickle_files(folder: Path) -> dict[str, Path]:
    """case id -> pickle path for <id>.pkl / <id>.pkl.gz in ``folder``; two files for one id is an error."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        cid = strip_suffix(path.name, PICKLE_SUFFIXES)
        if cid is None or is_hidden(path.name) or not path.is_file():
            continue
        if cid in found:
            raise DataError(f"{folder}: case {cid}: both {found[cid].name} and {path.name}")
        found[cid] = path
    return found


class KaggleEvalsegSource:
    """One task of the Kaggle evalseg dataset: CT volumes paired with GroundTruth pickles.

    ``case_ids()`` validates the pairing (GroundTruth without CT, CT without GroundTruth); with
    ``allow_missing=True`` unpaired cases are skipped with a warning instead (none when not ``warn_skipped``: the
    audit lists them itself). Only one case is decoded
    at a time. ``load_label`` / ``load_prediction`` work without CT (scoring the Task001-003 copies in shared),
    ``load_image`` without GroundTruth (inference).
    """

    channels = 1  # volumes: one intensity per voxel

    def __init__(self, path: str | os.PathLike, task: str | None = None, allow_missing: bool = False, *,
                 warn_skipped: bool = True) -> None:
        self.root: Path = _select_task(Path(path), task)
        meta = _read_metadata(self.root)
        self.name: str = str(meta.get("name", self.root.name))
        self.labels: dict[int, str] = parse_labels(meta.get("labels"), source=str(self.root / "metadata.json"))
        modality = meta.get("modality") or {}
        self.modality: str = str(modality.get("0", "CT")) if isinstance(modality, dict) else str(modality)
        self.allow_missing, self.warn_skipped = allow_missing, warn_skipped
        self._ct: dict[str, _CTRef] | None = None
        self._gt: dict[str, Path] | None = None
        self._ids: list[str] | None = None

    def __repr__(self) -> str:
        return f"KaggleEvalsegSource({str(self.root)!r})"

    # ------------------------------------------------------------------------------------------ listing

    @property
    def _zip_path(self) -> Path:
        return self.root / "CT.zip"

    def _list_ct(self) -> dict[str, _CTRef]:
        """case id -> CT reference, from the zip's central directory or the CT/ folder (nothing decompressed)."""
        if self._ct is not None:
            return self._ct
        ct_dir, zip_path = self.root / "CT", self._zip_path
        if zip_path.is_file() and ct_dir.is_dir():
            raise DataError(f"{self.root}: both CT.zip and CT/ exist; keep one so the cases are unambiguous")
        refs: dict[str, _CTRef] = {}

        def add(cid: str, ref: _CTRef) -> None:
            if cid in refs:
                raise DataError(f"{self.root}: case {cid}: two CT files, {refs[cid].name} and {ref.name}")
            refs[cid] = ref

        if zip_path.is_file():
            try:
                with zipfile.ZipFile(zip_path) as zf:
                    infos = zf.infolist()
            except (zipfile.BadZipFile, OSError) as err:
                raise CorruptFileError(f"{zip_path}: not a readable zip ({one_line(err)})") from None
            for info in infos:
                parts = info.filename.replace("\\", "/").split("/")
                cid = strip_suffix(parts[-1], NIFTI_SUFFIXES)
                # .keepkaggle, folders, macOS forks (__MACOSX/._x.nii) and non-NIfTI members are not cases.
                if info.is_dir() or cid is None or is_hidden(parts[-1]) or "__MACOSX" in parts:
                    continue
                if len(parts) > 1:
                    raise DataError(f"{zip_path}: member {info.filename!r} is not at the zip root")
                add(cid, _CTRef(f"CT.zip:{info.filename}", info.filename, None, info.file_size, info.CRC,
                                info.compress_size))
        elif ct_dir.is_dir():
            for path in sorted(ct_dir.iterdir()):
                cid = strip_suffix(path.name, NIFTI_SUFFIXES)
                if cid is None or is_hidden(path.name) or not path.is_file():
                    continue
                st = path.stat()
                add(cid, _CTRef(f"CT/{path.name}", None, path, st.st_size, st.st_mtime_ns))
        self._ct = refs
        return refs

    def _list_gt(self) -> dict[str, Path]:
        if self._gt is None:
            self._gt = _pickle_files(self.root / "GroundTruth")
        return self._gt

    def ground_truth_ids(self) -> list[str]:
        """Ids of every GroundTruth pickle, whether or not its CT is present."""
        return sorted(self._list_gt())

    def image_ids(self) -> list[str]:
        """Ids of every CT volume, whether or not its GroundTruth is present."""
        return sorted(self._list_ct())

    def case_ids(self) -> list[str]:
        """Ids with both CT and GroundTruth, as in the file names ("021" stays "021"). Validates the pairing."""
        if self._ids is not None:
            return list(self._ids)
        ct, gt = self._list_ct(), self._list_gt()
        where = ("in CT.zip" if self._zip_path.is_file() else "in CT/" if (self.root / "CT").is_dir()
                 else "(no CT.zip or CT/ folder)")
        ids = paired_ids(self.root, {c: f"GroundTruth/{p.name}" for c, p in gt.items()},
                         {c: ref.name for c, ref in ct.items()}, f"GroundTruth without CT {where}",
                         "CT without GroundTruth", allow_missing=self.allow_missing,
                         warn_skipped=self.warn_skipped)
        self._ids = ids
        return list(ids)

    def file_of(self, case_id: str) -> str:
        """The CT file name of the case (e.g. "021.nii"), for the split's grouping regex."""
        ref = self._ct_ref(case_id)
        return ref.member if ref.member is not None else ref.path.name

    def fingerprint(self) -> str:
        """Hash of metadata.json, CT member/file names with size and CRC (or mtime_ns), GroundTruth stamps."""
        stamps = [file_stamp(self.root / "metadata.json", self.root)]
        stamps += [(ref.name, ref.size, ref.stamp) for ref in self._list_ct().values()]
        stamps += [file_stamp(p, self.root) for p in self._list_gt().values()]
        return fingerprint_of(stamps)

    # ------------------------------------------------------------------------------------------ loading

    def _ct_ref(self, case_id: str) -> _CTRef:
        ref = self._list_ct().get(case_id)
        if ref is None:
            raise DataError(f"{self.root}: no CT for case {case_id!r}")
        return ref

    @contextlib.contextmanager
    def _member(self, ref: _CTRef, where: str) -> Iterator[Callable[[int], bytes]]:
        """``read(limit)``: the first ``limit + 1`` inflated bytes of the CT.zip member at most (never extracted: its
        name is never used as a path). Refused unread, as one CorruptFileError line naming ``where``: an encrypted
        member, one declaring more than ``MAX_MEMBER_RATIO`` times its compressed size; so is a zip or bzip2 error."""
        if ref.size > MAX_MEMBER_RATIO * max(ref.packed, 1):
            raise CorruptFileError(f"{where}: zip member declares {ref.size} bytes from {ref.packed} compressed "
                                   f"(ratio above {MAX_MEMBER_RATIO}: a zip bomb?)")
        try:
            with zipfile.ZipFile(self._zip_path) as zf:
                info = zf.getinfo(ref.member)
                if info.flag_bits & 0x1:
                    raise CorruptFileError(f"{where}: encrypted zip member (a password is needed to read it)")
                if info.compress_type == zipfile.ZIP_BZIP2:
                    yield lambda limit: _read_bzip2(self._zip_path, info, limit)
                else:  # zipfile inflates stored and deflated members no further than asked
                    with zf.open(info) as stream:
                        yield lambda limit: stream.read(limit + 1)
        except (MemoryError, DataError):
            raise
        except Exception as err:  # BadZipFile (CRC), EOFError/OSError (truncated bz2)
            raise CorruptFileError(f"{where}: corrupt zip member ({type(err).__name__}: {one_line(err)})") from None

    def _read_ct(self, case_id: str, ref: _CTRef) -> NiftiVolume:
        where = f"{self.root / ref.name} (case {case_id})"
        if ref.path is not None:
            return load_nifti(ref.path, source=where)
        with self._member(ref, where) as read:
            data = read(ref.size)  # the CRC is checked when the member is read to its end
        if len(data) > ref.size:
            raise CorruptFileError(f"{where}: corrupt zip member (inflates past the {ref.size} bytes it declares)")
        declared = nifti_data_end(data[:NIFTI2_HEADER_BYTES]) if data[:2] != GZIP_MAGIC else None  # .nii.gz: inflated
        if declared is not None and ref.size > declared[1] + TRAILING_SLACK:  # its own bound
            raise CorruptFileError(f"{where}: zip member declares {ref.size} bytes, its NIfTI header (shape "
                                   f"{declared[0]}) {declared[1]} (a zip bomb?)")
        return load_nifti(data=data, source=where)

    def shape(self, case_id: str) -> tuple[int, int, int]:
        """(X, Y, Z) of the case's CT from its NIfTI header, nothing decoded: of a CT.zip member only the first
        ``HEADER_READ`` bytes are inflated."""
        ref = self._ct_ref(case_id)
        where = f"{self.root / ref.name} (case {case_id})"
        if ref.path is not None:
            return nifti_shape(ref.path, source=where)
        with self._member(ref, where) as read:
            return nifti_shape(stream=io.BytesIO(read(HEADER_READ)), source=where)

    def _read_labels(self, path: Path, case_id: str) -> LabelVolume:
        try:
            lv = read_label_pickle(path)
        except DataError as err:
            raise type(err)(f"{err} (case {case_id})") from None
        check_labels(lv.volume, self.labels, where=f"{path} (case {case_id})")
        return lv

    def load_image(self, case_id: str) -> tuple[np.ndarray, NiftiVolume]:
        """The CT of any case in CT.zip / CT/: float32 (X, Y, Z) with NIfTI scaling, and its geometry."""
        nii = self._read_ct(case_id, self._ct_ref(case_id))
        nii.array = to_image(nii.array, source=f"{self.root / self._ct_ref(case_id).name} (case {case_id})")
        return nii.array, nii

    def load(self, case_id: str) -> Case:
        """Decode one case: image float32 (X, Y, Z) with NIfTI scaling applied, label uint8 (X, Y, Z)."""
        if case_id not in self.case_ids():
            raise DataError(f"{self.root}: case {case_id!r} is not in this task")
        ref, gt_path = self._ct_ref(case_id), self._list_gt()[case_id]
        lv = self._read_labels(gt_path, case_id)
        image, nii = self.load_image(case_id)
        if image.shape != lv.volume.shape:
            raise ShapeMismatchError(
                f"{self.root / ref.name} vs {gt_path} (case {case_id}): CT shape {image.shape} "
                f"!= GroundTruth shape {lv.volume.shape}"
            )
        return Case(
            case_id=case_id,
            image=image,
            label=lv.volume,
            spacing=spacing_of(nii.zooms, lv.voxelsize),
            source=str(self.root / ref.name),
            affine=nii.affine,
            meta={"task": self.name, "ground_truth": str(gt_path), "gt_voxelsize": lv.voxelsize},
        )

    def __iter__(self) -> Iterator[Case]:
        for case_id in self.case_ids():
            yield self.load(case_id)

    def load_label(self, case_id: str) -> np.ndarray:
        """The GroundTruth of any case in GroundTruth/, CT or not: uint8 (X, Y, Z)."""
        path = self._list_gt().get(case_id)
        if path is None:
            raise DataError(f"{self.root / 'GroundTruth'}: no GroundTruth for case {case_id!r}")
        return self._read_labels(path, case_id).volume

    # ------------------------------------------------------------------------------------------ predictions

    def predictions_methods(self) -> list[str]:
        """Names of the reference methods under Predictions/ (sorted)."""
        folder = self.root / "Predictions"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))

    def load_prediction(self, method: str, case_id: str) -> LabelVolume:
        """Predictions/<method>/<case_id>.pkl[.gz] decoded to a uint8 (X, Y, Z) volume."""
        if method not in self.predictions_methods():
            have = format_names(self.predictions_methods(), limit=40)
            raise DataError(f"{self.root / 'Predictions'}: no method {method!r}; have {have}")
        folder = self.root / "Predictions" / method
        path = _pickle_files(folder).get(_plain_name(case_id, "case id", folder))
        if path is None:
            raise DataError(f"{folder}: no prediction for case {case_id!r}")
        return self._read_labels(path, case_id)
