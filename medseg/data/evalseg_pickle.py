"""The evalseg GroundTruth / Predictions pickle format: restricted reading, dense decoding, and writing.

A pickle can run arbitrary code when loaded, so these files are read with an unpickler that resolves
exactly the globals listed in ../shared/docs/DATASET.md and refuses anything else *before* it is called.
The evalseg package itself is not needed: stand-in classes take the pickled state.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import sys
import types
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import BadLabelError, CorruptFileError, DataError, UnsafePickleError

EVALSEG_MODULE = "evalseg.io.segment_array"


class SegmentArray:
    """Stand-in for ``evalseg.io.segment_array.SegmentArray``: a sparse label volume.

    Attributes (from the pickle): dtype, shape, voxelsize (3 floats), fill_value, roi (tuple of slices),
    segments (list of SingleSegment, one per 3D connected component).
    """

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class SingleSegment:
    """Stand-in for ``evalseg.io.segment_array.SingleSegment``: one cropped component.

    Attributes: dtype, shape (of the full volume), voxelsize ([1,1,1]; use the parent's), fill_value,
    data (cropped array), roi (tuple of slices matching data.shape).
    """

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _numpy_multiarray(name: str):
    # numpy 1 pickles name numpy.core.multiarray, numpy 2 numpy._core.multiarray; both hold the same function.
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray
    return getattr(multiarray, name)


_ALLOWED = {
    (EVALSEG_MODULE, "SegmentArray"): lambda: SegmentArray,
    (EVALSEG_MODULE, "SingleSegment"): lambda: SingleSegment,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_multiarray("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_multiarray("scalar"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_multiarray("_reconstruct"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_multiarray("scalar"),
    ("builtins", "slice"): lambda: slice,
}
ALLOWED_GLOBALS = frozenset(_ALLOWED)


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the evalseg allow-list; any other global raises before it can be called."""

    def __init__(self, file, *, source: str = "<bytes>") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise UnsafePickleError(f"{self.source}: refused pickle global {module}.{name} "
                                    "(not in the evalseg allow-list)")
        return factory()


def _read_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CorruptFileError(f"{path}: cannot read ({err.strerror or err})") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic: .pkl.gz (GitHub copy), also tolerated under a .pkl name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise CorruptFileError(f"{path}: corrupt gzip ({err})") from None
    return raw


def load_segment_array(path: str | os.PathLike | None = None, *, data: bytes | None = None,
                       source: str | None = None) -> SegmentArray:
    """Load an evalseg pickle (``.pkl`` or ``.pkl.gz``) safely and check its structure."""
    if data is None:
        if path is None:
            raise ValueError("give a path or data")
        data = _read_bytes(path)
    src = source or (str(path) if path is not None else "<bytes>")
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source=src).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated / not a pickle / wrong protocol
        detail = " ".join(str(err).split())  # some unpickling errors span two lines
        raise CorruptFileError(f"{src}: not a readable evalseg pickle ({type(err).__name__}: {detail})") from None
    if not isinstance(obj, SegmentArray):
        raise DataError(f"{src}: pickle holds {type(obj).__name__}, expected evalseg SegmentArray")
    for key in ("shape", "segments"):
        if not hasattr(obj, key):
            raise DataError(f"{src}: SegmentArray has no '{key}' attribute")
    shape = _int_triple(obj.shape)
    if shape is None:
        raise DataError(f"{src}: SegmentArray.shape {obj.shape!r} is not three non-negative integers")
    if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise DataError(f"{src}: SegmentArray.shape {shape} has more than {MAX_VOXELS:,} voxels")
    if hasattr(obj, "voxelsize"):
        try:
            vs = np.asarray(obj.voxelsize, dtype=float).ravel()
        except (TypeError, ValueError):
            vs = np.array([])
        if vs.size != 3 or not np.all(np.isfinite(vs)) or not np.all(vs > 0):
            raise DataError(f"{src}: SegmentArray.voxelsize {obj.voxelsize!r} is not three positive numbers")
    if not isinstance(obj.segments, (list, tuple)):
        raise DataError(f"{src}: SegmentArray.segments is {type(obj.segments).__name__}, expected a list")
    for i, seg in enumerate(obj.segments):
        if not isinstance(seg, SingleSegment) or not hasattr(seg, "data") or not hasattr(seg, "roi"):
            raise DataError(f"{src}: segment {i} is not an evalseg SingleSegment with data and roi")
        if np.asarray(seg.data).dtype == object:
            raise DataError(f"{src}: segment {i} holds an object array")
        roi = seg.roi
        if not (isinstance(roi, (tuple, list)) and len(roi) == 3 and all(isinstance(r, slice) for r in roi)):
            raise DataError(f"{src}: segment {i} roi {roi!r} is not a tuple of three slices")
        if np.asarray(seg.data).ndim != 3:
            raise DataError(f"{src}: segment {i} data has {np.asarray(seg.data).ndim} dimensions, expected 3")
    return obj


MAX_VOXELS = 2**31  # 2 GiB of uint8 labels: far above a 512 x 512 x 1000 CT, far below what a forged shape could ask


def _int_triple(value) -> tuple[int, int, int] | None:
    try:
        items = tuple(value)
    except TypeError:
        return None
    if len(items) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                                  for v in items):
        return None
    return tuple(int(v) for v in items)


def dense(sa: SegmentArray, *, source: str = "<pickle>") -> np.ndarray:
    """Dense uint8 label volume: zeros(shape); for each segment vol[roi][data != fill] = data[data != fill]."""
    shape = tuple(int(s) for s in sa.shape)
    vol = np.zeros(shape, np.uint8)
    for i, seg in enumerate(sa.segments):
        data = np.asarray(seg.data)
        fill = getattr(seg, "fill_value", 0)
        mask = data != fill
        values = data[mask]
        if values.size and (values.min() < 0 or values.max() > 255 or not np.all(np.mod(values, 1) == 0)):
            raise BadLabelError(f"{source}: segment {i} has non-integer or out-of-range label values")
        try:
            region = vol[tuple(seg.roi)]
        except (TypeError, IndexError, ValueError) as err:
            raise DataError(f"{source}: segment {i} roi {seg.roi!r} does not index a volume of shape {shape} "
                            f"({err})") from None
        if region.shape != data.shape:
            raise DataError(f"{source}: segment {i} roi {region.shape} does not match its data {data.shape}")
        region[mask] = values.astype(np.uint8)
    return vol


@dataclass
class LabelVolume:
    """A decoded evalseg pickle."""

    volume: np.ndarray  # uint8, shape (X, Y, Z)
    voxelsize: tuple[float, float, float]
    n_segments: int
    source: str


def read_label_pickle(path: str | os.PathLike) -> LabelVolume:
    """Read and densify a GroundTruth / Predictions pickle."""
    sa = load_segment_array(path)
    vs = getattr(sa, "voxelsize", (1.0, 1.0, 1.0))
    return LabelVolume(
        volume=dense(sa, source=str(path)),
        voxelsize=tuple(float(v) for v in np.asarray(vs, dtype=float).ravel()[:3]),
        n_segments=len(sa.segments),
        source=str(path),
    )


# ----------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _evalseg_modules():
    """Make the stand-ins importable as evalseg.io.segment_array.* while pickling, then restore sys.modules."""
    names = ("evalseg", "evalseg.io", EVALSEG_MODULE)
    saved = {n: sys.modules.get(n) for n in names}
    pkg, io_mod, sa_mod = (types.ModuleType(n) for n in names)
    pkg.io, io_mod.segment_array = io_mod, sa_mod
    sa_mod.SegmentArray, sa_mod.SingleSegment = SegmentArray, SingleSegment
    originals = {c: (c.__module__, c.__qualname__) for c in (SegmentArray, SingleSegment)}
    for cls in (SegmentArray, SingleSegment):
        cls.__module__ = EVALSEG_MODULE
    sys.modules.update(dict(zip(names, (pkg, io_mod, sa_mod))))
    try:
        yield
    finally:
        for cls, (mod, qual) in originals.items():
            cls.__module__, cls.__qualname__ = mod, qual
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def to_segment_array(volume: np.ndarray, voxelsize) -> SegmentArray:
    """Sparse form of a dense label volume: one SingleSegment per 3D connected component (26-connectivity)."""
    from scipy import ndimage

    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"label volume must be 3D, got shape {volume.shape}")
    volume = volume.astype(np.uint8, copy=False)
    # label only inside the foreground's bounding box: a few small lesions in a 512x512x200 volume need
    # a tiny int32 array instead of one as large as the volume
    nonzero = [np.flatnonzero(volume.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    segments = []
    if nonzero[0].size:
        offset = tuple(int(idx[0]) for idx in nonzero)
        crop = tuple(slice(int(idx[0]), int(idx[-1]) + 1) for idx in nonzero)
        components, _ = ndimage.label(volume[crop] > 0, structure=np.ones((3, 3, 3), bool))
        boxes = ndimage.find_objects(components)
    else:
        offset, crop, components, boxes = (0, 0, 0), None, None, []
    for idx, box in enumerate(boxes, start=1):
        if box is None:
            continue
        roi = tuple(slice(int(s.start) + o, int(s.stop) + o, None) for s, o in zip(box, offset))
        data = np.where(components[box] == idx, volume[roi], 0).astype(np.uint8)
        seg = SingleSegment()
        seg.__dict__.update(dtype=np.dtype(np.uint8), shape=tuple(int(s) for s in volume.shape),
                            voxelsize=np.array([1, 1, 1], dtype=np.int32), fill_value=0, data=data, roi=roi)
        segments.append(seg)
    sa = SegmentArray()
    if segments:
        starts = [min(s.roi[a].start for s in segments) for a in range(3)]
        stops = [max(s.roi[a].stop for s in segments) for a in range(3)]
        roi = tuple(slice(a, b, None) for a, b in zip(starts, stops))
    else:
        roi = tuple(slice(0, int(s), None) for s in volume.shape)
    sa.__dict__.update(dtype=np.dtype(np.uint8), shape=tuple(int(s) for s in volume.shape),
                       voxelsize=np.asarray(voxelsize, dtype=np.float64), fill_value=0, roi=roi, segments=segments)
    return sa


def dumps_label_pickle(volume: np.ndarray, voxelsize) -> bytes:
    """Pickle bytes (protocol 4) that the real evalseg package loads as a SegmentArray."""
    sa = to_segment_array(volume, voxelsize)
    with _evalseg_modules():
        return pickle.dumps(sa, protocol=4)


def write_label_pickle(path: str | os.PathLike, volume: np.ndarray, voxelsize) -> Path:
    """Write ``volume`` as an evalseg pickle; gzip-compressed when the name ends in ``.gz``. Atomic."""
    from medseg.io_utils import atomic_write_bytes

    path = Path(path)
    raw = dumps_label_pickle(volume, voxelsize)
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=6, mtime=0)
    atomic_write_bytes(path, raw)
    return path
