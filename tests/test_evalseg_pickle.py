"""The evalseg pickle codec: conformance with the real files, round trip, and refusal of hostile pickles."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle

import numpy as np
import pytest

from medseg.data.evalseg_pickle import (
    ALLOWED_GLOBALS,
    SegmentArray,
    SingleSegment,
    _evalseg_modules,
    dumps_label_pickle,
    load_segment_array,
    read_label_pickle,
    to_segment_array,
    write_label_pickle,
)
from medseg.data.sources.common import label_counts
from medseg.errors import BadLabelError, CorruptFileError, DataError, UnsafePickleError
from tests.fixtures import evalseg_dir, expected


def test_every_ground_truth_file_matches_expected_json():
    """All 182 GroundTruth pickles decode to expected.json's shape, voxel size, hash, counts, segments (~20 s)."""
    root, truth = evalseg_dir(), expected()["ground_truth"]
    assert len(truth) == 182
    mismatches = []
    for rel, want in truth.items():
        lv = read_label_pickle(root / rel)
        got = {
            "shape": list(lv.volume.shape),
            "sha256": hashlib.sha256(lv.volume).hexdigest(),  # C-order bytes, no copy
            "voxels_per_label": {str(k): n for k, n in label_counts(lv.volume).items()},
            "n_segments": lv.n_segments,
        }
        for key, value in got.items():
            if value != want[key]:
                mismatches.append(f"{rel}: {key} {value} != {want[key]}")
        if not np.allclose(lv.voxelsize, want["voxelsize"], rtol=0, atol=1e-5):
            mismatches.append(f"{rel}: voxelsize {lv.voxelsize} != {want['voxelsize']}")
        assert lv.volume.dtype == np.uint8
    assert not mismatches, "\n".join(mismatches[:10])


# ------------------------------------------------------------------------------------------------ round trip


class _StandIn:
    def __setstate__(self, state):
        self.__dict__.update(state)


class _PlainUnpickler(pickle.Unpickler):
    """Independent of medseg: maps the evalseg classes to a stand-in, like shared/tools/check_kaggle_task.py."""

    def find_class(self, module, name):
        assert (module, name) in ALLOWED_GLOBALS, f"{module}.{name}"
        return _StandIn if module.startswith("evalseg") else super().find_class(module, name)


def _plain_dense(raw: bytes) -> tuple[np.ndarray, object]:
    sa = _PlainUnpickler(io.BytesIO(raw)).load()
    vol = np.zeros(sa.shape, np.uint8)
    for seg in sa.segments:
        data = np.asarray(seg.data)
        mask = data != seg.fill_value
        vol[seg.roi][mask] = data[mask]
    return vol, sa


@pytest.mark.parametrize("suffix", [".pkl", ".pkl.gz"])
def test_write_read_round_trip_and_independent_reader(tmp_path, suffix):
    volume = np.zeros((20, 18, 7), np.uint8)
    volume[2:5, 3:6, 1:3] = 1
    volume[10:14, 10:12, 4:6] = 2
    volume[12, 11, 5] = 3  # one component holding two label values (as in Task003)
    volume[18, 0, 0] = 1  # a one-voxel component at a corner
    spacing = (0.705078, 0.705078, 2.5)
    path = write_label_pickle(tmp_path / f"case{suffix}", volume, spacing)

    lv = read_label_pickle(path)
    assert lv.volume.dtype == np.uint8 and np.array_equal(lv.volume, volume)
    assert lv.voxelsize == pytest.approx(spacing) and lv.n_segments == 3

    raw = path.read_bytes()
    raw = gzip.decompress(raw) if suffix.endswith(".gz") else raw
    assert raw[:2] == b"\x80\x04"  # protocol 4
    plain, sa = _plain_dense(raw)  # asserts every global it meets is on the allow-list
    assert np.array_equal(plain, volume)
    assert np.allclose(sa.voxelsize, spacing) and tuple(sa.shape) == volume.shape


def test_empty_volume_round_trips_with_no_segments(tmp_path):
    path = write_label_pickle(tmp_path / "empty.pkl", np.zeros((4, 5, 6), np.uint8), (1.0, 1.0, 3.0))
    lv = read_label_pickle(path)
    assert lv.n_segments == 0 and lv.volume.shape == (4, 5, 6) and not lv.volume.any()


# ------------------------------------------------------------------------------------------------ hostile pickles


def _global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-0 pickle calling module.name(arg) on load: GLOBAL, MARK, STRING, TUPLE, REDUCE, STOP."""
    return f"c{module}\n{name}\n(S{arg!r}\ntR.".encode()


@pytest.mark.parametrize(
    "module, name, payload",
    [
        ("os", "system", "touch {marker}"),
        ("posix", "system", "touch {marker}"),
        ("builtins", "exec", "open({marker!r}, 'w').write('pwned')"),
        ("builtins", "eval", "open({marker!r}, 'w').write('pwned')"),
        ("subprocess", "getoutput", "touch {marker}"),
    ],
)
def test_hostile_global_is_refused_and_never_called(tmp_path, module, name, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(_global_call(module, name, payload.format(marker=str(marker))))
    with pytest.raises(UnsafePickleError, match=rf"{module}\.{name}") as err:
        read_label_pickle(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


class _Exploit:
    """Pickles as a call of os.system (``posix.system`` on Linux) through protocol 4's STACK_GLOBAL."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_hostile_reduce_inside_a_valid_segment_array_is_refused(tmp_path):
    marker = tmp_path / "marker"
    volume = np.zeros((6, 6, 3), np.uint8)
    volume[1:3, 1:3, 1] = 1
    sa = to_segment_array(volume, (1.0, 1.0, 1.0))
    sa.segments[0].data = _Exploit(f"touch {marker}")  # hidden one level down, after allowed globals
    with _evalseg_modules():
        raw = pickle.dumps(sa, protocol=4)
    path = tmp_path / "evil.pkl.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system") as err:
        read_label_pickle(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_top_level_exploit_object_is_refused(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(UnsafePickleError, match=r"system"):
        load_segment_array(data=pickle.dumps(_Exploit(f"touch {marker}"), protocol=4), source="evil")
    assert not marker.exists()


def test_allowed_global_with_wrong_structure_is_a_data_error(tmp_path):
    path = tmp_path / "slice.pkl"
    path.write_bytes(pickle.dumps(slice(1, 2), protocol=4))  # builtins.slice is allowed, but it is no SegmentArray
    with pytest.raises(DataError, match="expected evalseg SegmentArray") as err:
        read_label_pickle(path)
    assert not isinstance(err.value, UnsafePickleError) and str(path) in str(err.value)


def test_segment_array_without_segments_or_with_foreign_segments_is_a_data_error():
    bare = SegmentArray()
    bare.__dict__.update(shape=(2, 2, 2))  # no 'segments'
    with _evalseg_modules():
        raw = pickle.dumps(bare, protocol=4)
    with pytest.raises(DataError, match="no 'segments'"):
        load_segment_array(data=raw, source="bare.pkl")

    wrong = SegmentArray()
    wrong.__dict__.update(shape=(2, 2, 2), segments=[slice(0, 1)])
    with _evalseg_modules():
        raw = pickle.dumps(wrong, protocol=4)
    with pytest.raises(DataError, match="segment 0 is not an evalseg SingleSegment"):
        load_segment_array(data=raw, source="wrong.pkl")


def test_roi_that_does_not_match_the_data_is_a_data_error(tmp_path):
    raw = dumps_label_pickle(np.pad(np.ones((2, 2, 2), np.uint8), 2), (1, 1, 1))
    sa = load_segment_array(data=raw)
    assert isinstance(sa.segments[0], SingleSegment)
    sa.segments[0].roi = (slice(0, 1), slice(0, 2), slice(0, 2))
    with _evalseg_modules():
        bad = pickle.dumps(sa, protocol=4)
    path = tmp_path / "bad_roi.pkl"
    path.write_bytes(bad)
    with pytest.raises(DataError, match="roi"):
        read_label_pickle(path)


def test_truncated_pickle_is_a_data_error(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(dumps_label_pickle(np.ones((3, 3, 3), np.uint8), (1, 1, 1))[:-20])
    with pytest.raises(CorruptFileError, match="not a readable evalseg pickle") as err:
        read_label_pickle(path)
    assert str(path) in str(err.value)


def test_unreadable_files_and_non_label_values_raise_their_own_error_types(tmp_path):
    """What the data audit reports them as: corrupt_file, bad_label (the kind of each DataError subclass)."""
    raw = dumps_label_pickle(np.pad(np.ones((2, 2, 2), np.uint8), 2), (1, 1, 1))
    cut = tmp_path / "cut.pkl.gz"
    cut.write_bytes(gzip.compress(raw)[:-8])
    with pytest.raises(CorruptFileError, match=r"cut\.pkl\.gz: corrupt gzip"):
        read_label_pickle(cut)
    with pytest.raises(CorruptFileError, match=r"nowhere\.pkl: cannot read"):
        read_label_pickle(tmp_path / "nowhere.pkl")
    sa = load_segment_array(data=raw)
    sa.segments[0].data = sa.segments[0].data.astype(np.int16) * 300
    with _evalseg_modules():
        (tmp_path / "300.pkl").write_bytes(pickle.dumps(sa, protocol=4))
    with pytest.raises(BadLabelError, match=r"300\.pkl: segment 0 has non-integer or out-of-range label values"):
        read_label_pickle(tmp_path / "300.pkl")


@pytest.mark.parametrize("field, value, message", [
    ("shape", None, r"shape None is not three non-negative integers"),
    ("shape", (6, 6), r"shape \(6, 6\) is not three"),
    ("shape", (6, -6, 6), r"shape \(6, -6, 6\) is not three"),
    ("shape", (100000, 100000, 1000), r"more than 2,147,483,648 voxels"),  # a few hundred bytes asking for 9 TiB
    ("voxelsize", "abc", r"voxelsize 'abc' is not three positive numbers"),
    ("voxelsize", (1.0, 1.0), r"voxelsize \(1\.0, 1\.0\) is not three"),
    ("segments", None, r"segments is NoneType, expected a list"),
    ("roi", (slice(0, 2), slice(0, 2), slice(0, 2), slice(0, 2)), r"segment 0 roi .* is not a tuple of three slices"),
])
def test_malformed_segment_array_is_a_one_line_data_error(tmp_path, field, value, message):
    """Every structural fault names the file instead of surfacing as TypeError, IndexError or MemoryError."""
    sa = load_segment_array(data=dumps_label_pickle(np.pad(np.ones((2, 2, 2), np.uint8), 2), (1, 1, 1)))
    (sa.segments[0] if field == "roi" else sa).__dict__[field] = value
    with _evalseg_modules():
        raw = pickle.dumps(sa, protocol=4)
    path = tmp_path / "002.pkl"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=message) as err:
        read_label_pickle(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
