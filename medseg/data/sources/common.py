"""Helpers shared by the readers: NIfTI decoding, label maps and label checks, file-listing fingerprints."""
from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np

from medseg.errors import (
    BadLabelError,
    CorruptFileError,
    DataError,
    MissingPairError,
    NonFiniteImageError,
    UnknownLabelError,
)
from medseg.io_utils import stable_hash

log = logging.getLogger("medseg.data.sources")
_SILENT = logging.getLogger("medseg.data.sources.nifti_header")  # nibabel's notes on fixable header fields: dropped
_SILENT.propagate = False
_SILENT.addHandler(logging.NullHandler())

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def one_line(err: BaseException | str) -> str:
    """Error text on a single line (nibabel and zipfile messages can hold newlines)."""
    return " ".join(str(err).split())


def strip_suffix(name: str, suffixes: Iterable[str]) -> str | None:
    """``name`` without the first matching suffix (case-insensitive), or None when none matches."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def is_hidden(name: str) -> bool:
    """macOS resource forks (``._x.nii.gz``) and other dot files are never data."""
    return name.startswith(".")


@dataclass
class NiftiVolume:
    """A decoded NIfTI file: ``array`` has nibabel scaling applied, shape (X, Y, Z) in (i, j, k) order.

    ``header`` and ``affine`` let a mask be written back with the input's geometry.
    """

    array: np.ndarray
    zooms: tuple[float, ...]
    affine: np.ndarray
    header: object  # nibabel Nifti1Header / Nifti2Header

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def load_nifti(path: str | os.PathLike | None = None, *, data: bytes | None = None, source: str) -> NiftiVolume:
    """Read a NIfTI-1/2 file from ``path`` (.nii or .nii.gz) or from in-memory ``data`` (a zip member).

    Trailing singleton dimensions past the third are dropped and a 2D image becomes (X, Y, 1);
    anything with more than one volume is refused. ``source`` names the file in error messages.
    """
    import nibabel as nib

    if data is None:
        _check_room(_file_head(path), os.path.getsize(path), source=source, gz=str(path).lower().endswith(".gz"))
    try:
        if data is not None:
            if data[:2] == GZIP_MAGIC:  # .nii.gz member
                data = _gunzip_nifti(data, source)
            _check_room(data[:NIFTI2_HEADER_BYTES], len(data), source=source)
            # sizeof_hdr (first 4 bytes, either byte order) is 348 for NIfTI-1 and 540 for NIfTI-2.
            nifti2 = 540 in (int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big"))
            img = (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(data)
        else:
            img = nib.load(os.fspath(path))
        array = _scaled_float32(img.dataobj)  # applies scl_slope / scl_inter
        zooms = tuple(float(z) for z in img.header.get_zooms())
        affine = np.asarray(img.affine, dtype=np.float64)
        header = img.header
    except (MemoryError, DataError):
        raise
    except Exception as err:  # nibabel, gzip and short reads each raise their own types; all mean "damaged file"
        raise CorruptFileError(f"{source}: unreadable NIfTI ({type(err).__name__}: {one_line(err)})") from None
    array = array.reshape(volume_shape(array.shape, source=source), order="A")  # a view: singleton axes only
    return NiftiVolume(array=array, zooms=zooms[:3], affine=affine, header=header)


GZIP_MAGIC = b"\x1f\x8b"
DEFLATE_MAX_RATIO = 1032  # DEFLATE's ceiling: a .nii.gz never inflates to more than ~1032 times its size
TRAILING_SLACK = 1 << 16  # bytes a NIfTI may hold past its voxel data (padding) before it is refused as a bomb


def _parse_header(head: bytes):
    """The nibabel header of a NIfTI-1/2 header block; raises where nibabel's loader raises."""
    import nibabel as nib

    nifti2 = NIFTI2_HEADER_BYTES in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
    header_class = nib.Nifti2Header if nifti2 else nib.Nifti1Header
    header = header_class(head[:header_class.template_dtype.itemsize], check=False)
    header.check_fix(logger=_SILENT)  # nibabel's notes on fixable fields are the load's to give
    return header


def nifti_data_end(head: bytes) -> tuple[tuple[int, ...], int] | None:
    """(data shape, bytes the file needs: vox_offset + voxels x bytes per voxel) declared by a NIfTI header block;
    None when the header cannot be read (the load then says why)."""
    try:
        header = _parse_header(head)
        shape = tuple(int(n) for n in header.get_data_shape())
        return shape, int(header.get_data_offset()) + math.prod(shape) * header.get_data_dtype().itemsize
    except Exception:  # any damage: reported by the load itself
        return None


def _check_room(head: bytes, room: int, *, source: str, gz: bool = False) -> None:
    """CorruptFileError before any voxel is allocated when the header in ``head`` declares more bytes than a file of
    ``room`` bytes can hold (``gz``: inflated at DEFLATE's ceiling): nibabel would allocate them all first."""
    declared = nifti_data_end(head)
    if declared is not None and declared[1] > (room * DEFLATE_MAX_RATIO if gz else room):
        gzipped = f"a {room}-byte .nii.gz inflates to at most {room * DEFLATE_MAX_RATIO}"
        holds = gzipped if gz else f"the file holds {room}"
        raise CorruptFileError(f"{source}: unreadable NIfTI (its header declares shape {declared[0]}, "
                               f"{declared[1]} bytes; {holds})")


def _file_head(path: str | os.PathLike) -> bytes:
    """The header block of the NIfTI file at ``path`` (gunzipped); b"" when it cannot be read (the load says why)."""
    try:
        with open(path, "rb") as file:
            return _header_block(file)
    except (OSError, EOFError, zlib.error):
        return b""


def _gunzip_nifti(data: bytes, source: str) -> bytes:
    """A .nii.gz member inflated no further than its header's voxel data (and ``TRAILING_SLACK``): a gzip bomb stops
    there, as one CorruptFileError line."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        head = stream.read(NIFTI2_HEADER_BYTES)
        declared = nifti_data_end(head)
        limit = (declared[1] if declared else len(data) * DEFLATE_MAX_RATIO) + TRAILING_SLACK
        body = stream.read(limit + 1 - len(head))
    if len(head) + len(body) > limit:
        raise CorruptFileError(f"{source}: .nii.gz inflates past the {limit} bytes its header declares "
                               "(a decompression bomb?)")
    return head + body


def volume_shape(shape: Iterable[int], *, source: str) -> tuple[int, int, int]:
    """The (X, Y, Z) a NIfTI data shape is read as: trailing singleton dimensions past the third dropped, a 2D image
    of depth 1; DataError naming ``source`` for anything with more than one volume."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 2:
        shape += (1,)
    if len(shape) != 3:
        raise DataError(f"{source}: NIfTI of shape {shape} is not a single 3D volume")
    if 0 in shape:
        raise CorruptFileError(f"{source}: NIfTI of shape {shape} holds no voxel (a zero-length axis)")
    return shape


NIFTI2_HEADER_BYTES = 540  # NIfTI-1's header is 348 bytes: 540 holds either


def _header_block(stream: BinaryIO) -> bytes:
    """The first ``NIFTI2_HEADER_BYTES`` of a NIfTI stream, gunzipping a .nii.gz as far as needed and no further."""
    head = stream.read(NIFTI2_HEADER_BYTES)
    if head[:2] != GZIP_MAGIC:
        return head
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    out = inflate.decompress(head)
    while len(out) < NIFTI2_HEADER_BYTES and (chunk := stream.read(4096)):
        out += inflate.decompress(chunk)
    return out[:NIFTI2_HEADER_BYTES]


def nifti_shape(path: str | os.PathLike | None = None, *, stream: BinaryIO | None = None,
                source: str) -> tuple[int, int, int]:
    """(X, Y, Z) of a NIfTI-1/2 file at ``path`` or open as ``stream`` (a zip member), as ``load_nifti`` returns its
    array, from the header alone: no voxel is read (of a bzip2 zip member, only the first block is decompressed).
    """
    try:
        if stream is None:
            with open(path, "rb") as file:
                head = _header_block(file)
        else:
            head = _header_block(stream)
        shape = _parse_header(head).get_data_shape()
    except MemoryError:
        raise
    except Exception as err:  # nibabel, zlib and short reads each raise their own types; all mean "damaged file"
        raise CorruptFileError(f"{source}: unreadable NIfTI header ({type(err).__name__}: {one_line(err)})") from None
    return volume_shape(shape, source=source)


def spacing_of(zooms: tuple[float, ...], fallback: Iterable[float] | None = None) -> tuple[float, float, float]:
    """Voxel size from header zooms; ``fallback`` (e.g. a pickle's voxelsize) when they are missing or invalid."""
    if len(zooms) == 3 and all(np.isfinite(z) and z > 0 for z in zooms):
        return tuple(float(z) for z in zooms)
    if fallback is not None:
        return tuple(float(v) for v in fallback)
    # A 2D NIfTI has two zooms: the slice thickness is unknown, 1 mm keeps the geometry usable.
    return tuple(float(z) if np.isfinite(z) and z > 0 else 1.0 for z in (tuple(zooms) + (1.0, 1.0, 1.0))[:3])


def is_label_array(array: np.ndarray) -> bool:
    """True when every value is an integer in 0..255 (what a label volume may hold)."""
    if array.size == 0:
        return True
    if array.dtype.kind == "b":
        return True
    if array.dtype.kind not in "iuf":
        return False
    lo, hi = array.min(), array.max()
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and hi <= 255):
        return False
    return array.dtype.kind in "iu" or bool(np.all(np.mod(array, 1) == 0))


def _scaled_float32(proxy) -> np.ndarray:
    """The array with scl_slope / scl_inter applied, in float32 where scaling is set: nibabel scales in float64,
    so a 512x512x300 int16 CT with an intercept of -1024 peaked at 900 MB (raw + float64 + float32) instead of
    450. NIfTI stores slope and intercept as float32, so no precision is lost for image values."""
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    unscaled = (slope in (1.0, None) or np.isnan(slope)) and (inter in (0.0, None) or np.isnan(inter))
    if not hasattr(proxy, "get_unscaled") or unscaled:
        return np.asanyarray(proxy)  # no scaling: the stored dtype as is
    array = np.asarray(proxy.get_unscaled()).astype(np.float32)
    array *= np.float32(slope)
    array += np.float32(inter)
    return array


def to_label(array: np.ndarray, *, source: str) -> np.ndarray:
    """Integer-valued array -> uint8 labels, same shape; BadLabelError when values are fractional or out of 0..255."""
    if not is_label_array(array):
        raise BadLabelError(f"{source}: label values are not integers in 0..255 (dtype {array.dtype})")
    return np.asarray(array).astype(np.uint8, copy=False)


def to_image(array: np.ndarray, *, source: str | None = None) -> np.ndarray:
    """Scaled image data -> float32, same shape (no intensity assumption: HU or raw values). With ``source``, NaN or
    infinite values are a NonFiniteImageError naming it (``check_finite``)."""
    image = np.asarray(array).astype(np.float32, copy=False)
    if source is not None:
        check_finite(image, source=source)
    return image


def check_finite(image: np.ndarray, *, source: str) -> None:
    """NonFiniteImageError naming ``source`` when ``image`` holds NaN or infinite values: they would reach the cache
    and the loss as NaN. Two reductions, no volume-sized temporary (min and max propagate NaN)."""
    if image.dtype.kind == "f" and image.size and not (np.isfinite(image.min()) and np.isfinite(image.max())):
        raise NonFiniteImageError(f"{source}: image holds NaN or infinite values")


def label_counts(label: np.ndarray) -> dict[int, int]:
    """Voxels per non-zero label value of a uint8 volume."""
    flat = label.ravel()
    # bincount widens to int64: on the foreground only it is ~10x faster for mostly-background volumes.
    counts = np.bincount(flat[flat != 0], minlength=256)
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}


def check_labels(label: np.ndarray, labels: dict[int, str], *, where: str, hint: str = "") -> None:
    """UnknownLabelError naming ``where`` (file and case) when ``label`` holds values not listed in ``labels``; ``hint``
    (the likely fix, starting with "; ") ends the message."""
    unknown = sorted(set(label_counts(label)) - set(labels))
    if unknown:
        raise UnknownLabelError(f"{where}: label values {format_names([str(v) for v in unknown], 12).join('[]')} "
                                f"not in the dataset labels {sorted(labels)}{hint}")


def parse_labels(raw: object, *, source: str) -> dict[int, str]:
    """Label map from metadata: {"0": "background", ...} (evalseg, MSD) or {"background": 0, ...} (nnU-Net v2)."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{source}: 'labels' must be a non-empty mapping")
    try:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
            labels = {int(v): str(k) for k, v in raw.items()}
        else:
            labels = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        # nnU-Net v2 region labels ({"whole tumor": [1, 2, 3]}) have no single value per name.
        raise DataError(f"{source}: 'labels' must map integer values to names, got {raw!r}") from None
    if len(labels) != len(raw):
        raise DataError(f"{source}: 'labels' maps two names to one value: {raw!r}")
    return labels


def format_names(names: list[str], limit: int = 5) -> str:
    """'a, b, c (+12 more)': keeps error messages on one readable line."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def paired_ids(root: Path, first: dict[str, str], second: dict[str, str], first_only: str, second_only: str, *,
               allow_missing: bool, warn_skipped: bool = True, hint: str = "") -> list[str]:
    """Sorted ids present in both ``first`` and ``second`` (id -> file name shown in messages).

    Unpaired ids are a MissingPairError naming their cases and files (``first_only`` / ``second_only`` say what
    is missing), or, with ``allow_missing``, skipped, with a warning naming them unless not ``warn_skipped``.
    """
    problems = []
    for what, have, other in ((first_only, first, second), (second_only, second, first)):
        ids = sorted(set(have) - set(other))
        if ids:
            problems.append(f"{what} for case(s) {format_names(ids)}: {format_names([have[i] for i in ids])}")
    if problems and not allow_missing:
        raise MissingPairError(f"{root}: " + "; ".join(problems) + hint)
    if problems and warn_skipped:
        log.warning("%s: skipping unpaired cases: %s", root, "; ".join(problems))
    ids = sorted(set(first) & set(second))
    if not ids:
        raise DataError(f"{root}: no complete case to read")
    return ids


def files_by_key(folder: Path, key_of: Callable[[Path], str | None], missing: str = "missing folder"
                 ) -> dict[str, Path]:
    """case key -> file for the files of ``folder`` in name order: ``key_of(path)`` gives a file's key, None to skip
    it; hidden files (``._x.nii.gz``) and sub-folders are skipped. Two files with one key are an error."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {missing}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if is_hidden(path.name) or not path.is_file() or (key := key_of(path)) is None:
            continue
        if key in found:
            raise DataError(f"{folder}: case {key}: both {found[key].name} and {path.name}")
        found[key] = path
    return found


def read_json_object(path: Path, missing: str) -> dict:
    """A JSON object from ``path``; a missing file says ``missing``; unreadable JSON or another type: one line."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing ({missing})") from None
    except (OSError, ValueError) as err:
        raise CorruptFileError(f"{path}: unreadable JSON ({one_line(err)})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def file_stamp(path: Path, root: Path) -> tuple[str, int, int]:
    """(path relative to root, size, mtime_ns): what a fingerprint hashes for a plain file; no read."""
    st = path.stat()
    return (path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)


def fingerprint_of(stamps: Iterable[tuple], settings: dict | None = None) -> str:
    """stable_hash over sorted file stamps (and reader settings that change what the cases are)."""
    return stable_hash({"files": sorted(stamps), "settings": settings or {}})


class PairedFiles:
    """Case lookup shared by sources whose cases are (image file, label file) pairs from ``_index()``."""

    root: Path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def _index(self) -> dict[str, tuple[Path, Path]]:
        raise NotImplementedError

    def case_ids(self) -> list[str]:
        return list(self._index())

    def _pair(self, case_id: str) -> tuple[Path, Path]:
        pair = self._index().get(case_id)
        if pair is None:
            raise DataError(f"{self.root}: case {case_id!r} is not in this dataset")
        return pair

    def file_of(self, case_id: str) -> str:
        return self._pair(case_id)[0].name
