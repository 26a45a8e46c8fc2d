"""Builders of tiny on-disk datasets for tests (Kaggle evalseg, MSD / nnU-Net, 2D folders), real-data paths, and a
wait on a running command."""
from __future__ import annotations

import json
import struct
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medseg.data.evalseg_pickle import write_label_pickle

EVALSEG_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "evalseg"
SPACING = (0.8, 0.75, 2.5)
SLOPE, INTER = 2.0, -1024.0  # stored raw * 2 - 1024: readers must apply the NIfTI scaling


def evalseg_dir() -> Path:
    """The real evalseg files in ../shared; skips the calling test when the folder is absent."""
    import pytest

    if not EVALSEG_DIR.is_dir():
        pytest.skip(f"real evalseg files not found at {EVALSEG_DIR} (check out ../shared beside the repo)")
    return EVALSEG_DIR


def expected() -> dict:
    """../shared/data/evalseg/expected.json (skips when absent)."""
    return json.loads((evalseg_dir() / "expected.json").read_text())


def tiny_case(seed: int, shape: tuple[int, int, int] = (10, 12, 4), n_labels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(raw int16 stored values, uint8 label) of a small volume with a box of each label 1..n_labels."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 600, size=shape, dtype=np.int16)
    label = np.zeros(shape, np.uint8)
    for value in range(1, n_labels + 1):
        x = 1 + 2 * (value - 1) % (shape[0] - 2)
        label[x : x + 2, 2:6, 1:3] = value
    return raw, label


def nifti_image(raw: np.ndarray, spacing=SPACING, scaled: bool = True):
    import nibabel as nib

    img = nib.Nifti1Image(raw, np.diag([*spacing, 1.0]))
    if scaled:
        img.header.set_slope_inter(SLOPE, INTER)
    return img


def hu(raw: np.ndarray) -> np.ndarray:
    """What a reader must return for ``raw`` written with ``nifti_image(scaled=True)``: float32 (X, Y, Z)."""
    return (raw.astype(np.float32) * SLOPE + INTER).astype(np.float32)


def write_nifti(path: Path, raw: np.ndarray, spacing=SPACING, scaled: bool = True) -> Path:
    """``path`` ending in .nii or .nii.gz."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nifti_image(raw, spacing, scaled), str(path))
    return path


def nifti_bytes(raw: np.ndarray, spacing=SPACING, gz: bool = False) -> bytes:
    """The on-disk bytes of a .nii (or .nii.gz when ``gz``) holding ``raw`` with the test scaling."""
    import gzip

    data = nifti_image(raw, spacing).to_bytes()
    return gzip.compress(data, mtime=0) if gz else data


def make_kaggle_task(
    root: Path,
    cases: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    folder: str = "Task009_Tiny",
    name: str | None = None,
    labels: dict[int, str] | None = None,
    ct: str = "zip",
    member_suffix: str = ".nii",
    gt_suffix: str = ".pkl",
    gt_only: dict[str, np.ndarray] | None = None,
    ct_only: dict[str, np.ndarray] | None = None,
    predictions: dict[str, dict[str, np.ndarray]] | None = None,
) -> Path:
    """Write a Kaggle-layout task under ``root/folder``; returns the task folder.

    cases: id -> (raw int16 CT, uint8 label). ct: "zip" (bzip2 CT.zip with a .keepkaggle member marked
    encrypted, as on Kaggle) or "folder" (CT/). member_suffix: ".nii" or ".nii.gz" for the CT files.
    gt_only / ct_only add unpaired GroundTruth / CT files; predictions: method -> id -> label volume.
    """
    task = root / folder
    task.mkdir(parents=True, exist_ok=True)
    meta = {"labels": {str(k): v for k, v in (labels or {0: "background", 1: "tumor"}).items()},
            "modality": {"0": "CT"}, "name": name or folder, "licence": "CC-BY"}
    (task / "metadata.json").write_text(json.dumps(meta, indent=1))
    ct_volumes = {cid: raw for cid, (raw, _) in cases.items()} | dict(ct_only or {})
    gt_volumes = {cid: label for cid, (_, label) in cases.items()} | dict(gt_only or {})
    if ct == "zip":
        with zipfile.ZipFile(task / "CT.zip", "w", compression=zipfile.ZIP_BZIP2) as zf:
            zf.writestr(".keepkaggle", b"kaggle keeps this file")
            for cid, raw in ct_volumes.items():
                zf.writestr(cid + member_suffix, nifti_bytes(raw, gz=member_suffix.endswith(".gz")))
        patch_zip_member(task / "CT.zip", ".keepkaggle", flag_bits=0x1)  # zipfile cannot write encrypted members
    else:
        for cid, raw in ct_volumes.items():
            write_nifti(task / "CT" / (cid + member_suffix), raw)
    for cid, label in gt_volumes.items():
        write_label_pickle(task / "GroundTruth" / (cid + gt_suffix), label, SPACING)
    for method, volumes in (predictions or {}).items():
        for cid, label in volumes.items():
            write_label_pickle(task / "Predictions" / method / (cid + gt_suffix), label, SPACING)
    return task


def patch_zip_member(zip_path: Path, member: str, *, crc: int | None = None, flag_bits: int | None = None,
                     file_size: int | None = None) -> None:
    """Rewrite the CRC-32 and/or OR in general-purpose flag bits and/or set the uncompressed size of one member, in
    its local and central headers.

    Builds what zipfile refuses to write: a member with a wrong CRC (corruption), marked encrypted, or declaring a
    size it does not hold (a zip bomb's claim).
    """
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(member)
        data = bytearray(zip_path.read_bytes())
    central = data.find(b"PK\x01\x02")
    while central != -1:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, central + 28)
        local = struct.unpack_from("<I", data, central + 42)[0]
        if data[central + 46 : central + 46 + name_len].decode() == member and local == info.header_offset:
            # (header start, offset of the flag field, of the CRC field, of the uncompressed size field)
            for start, flag_at, crc_at, size_at in ((central, 8, 16, 24), (local, 6, 14, 22)):
                if flag_bits is not None:
                    flags = struct.unpack_from("<H", data, start + flag_at)[0]
                    struct.pack_into("<H", data, start + flag_at, flags | flag_bits)
                if crc is not None:
                    struct.pack_into("<I", data, start + crc_at, crc)
                if file_size is not None:
                    struct.pack_into("<I", data, start + size_at, file_size)
            zip_path.write_bytes(bytes(data))
            return
        central = data.find(b"PK\x01\x02", central + 46 + name_len + extra_len + comment_len)
    raise KeyError(member)


def make_msd(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], *, v2: bool = False,
             labels: dict[int, str] | None = None) -> Path:
    """An MSD (``imagesTr/<id>.nii.gz``, labels {"0": ...}) or nnU-Net v2 (``<id>_0000``, {"name": 0}) folder."""
    labels = labels or {0: "background", 1: "liver"}
    if v2:
        meta = {"channel_names": {"0": "CT"}, "labels": {v: k for k, v in labels.items()},
                "numTraining": len(cases), "file_ending": ".nii.gz"}
    else:
        meta = {"name": "Liver", "modality": {"0": "CT"}, "labels": {str(k): v for k, v in labels.items()},
                "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for cid, (raw, label) in cases.items():
        write_nifti(root / "imagesTr" / (f"{cid}_0000.nii.gz" if v2 else f"{cid}.nii.gz"), raw)
        write_nifti(root / "labelsTr" / f"{cid}.nii.gz", label, scaled=False)
    return root


def write_image(path: Path, array: np.ndarray) -> Path:
    """``array`` uint8 (rows, cols) or (rows, cols, 3) saved with Pillow, format from the suffix."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def wait_while_running(proc: subprocess.Popen, ready: Callable[[], Any], *, timeout: float, what: str,
                       poll: float = 0.2) -> Any:
    """Poll ``ready()`` every ``poll`` s until it returns something truthy (returned) while ``proc`` keeps running; a
    process that exits first fails the test with its output, a timeout kills it and fails the test naming ``what``.

    ``timeout`` only bounds a hang: make it generous (a slow or loaded machine must never reach it). ``poll`` must be
    well below the time the awaited state lasts when the caller has to act inside it (e.g. a trial between epochs)."""
    import pytest

    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None  # polled before ready(): an event that came just before the exit still counts
        value = ready()
        if value:
            return value
        assert not exited, proc.communicate()
        if time.monotonic() > deadline:
            break
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"{what} did not happen within {timeout:.0f} s")


# ------------------------------------------------------------------------------------- hostile inputs (issue 14)
# Each builder writes one dataset under ``root`` holding one hostile file and returns the dataset folder; ``HOSTILE``
# names them. ``read_dataset`` reads a dataset as training does; tests and benchmarks/reliability_hostile.py run it
# in a child process (``HOSTILE_CHILD``) to measure its peak memory.

BOMB_BYTES = 200 << 20  # zeros behind a bomb: bzip2 packs them into a few hundred bytes, zlib into ~200 kB
DECLARED_BYTES = 4_000_000_000  # what the patched member claims to inflate to


def _kaggle_plus_member(root: Path, member: str, data: bytes = b"", *, bomb: int = 0, ct_case: str = "002") -> Path:
    """A one-case CT.zip task with an extra bzip2 member ``member`` (``data`` then ``bomb`` zeros, streamed) and a
    GroundTruth for ``ct_case``."""
    task = make_kaggle_task(root, {"001": tiny_case(0)})
    info = zipfile.ZipInfo(member, (1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_BZIP2
    with zipfile.ZipFile(task / "CT.zip", "a") as zf, zf.open(info, "w") as out:
        out.write(data)
        for _ in range(bomb >> 20):
            out.write(bytes(1 << 20))
    write_label_pickle(task / "GroundTruth" / f"{ct_case}.pkl", tiny_case(1)[1], SPACING)
    return task


def nifti_with_dims(raw: np.ndarray, dims: tuple[int, ...], *, gz: bool = False) -> bytes:
    """``nifti_bytes(raw)`` whose header's dim field is rewritten to ``dims`` (the voxel data left as is)."""
    import gzip

    data = bytearray(nifti_bytes(raw))
    struct.pack_into("<8h", data, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    return gzip.compress(bytes(data), mtime=0) if gz else bytes(data)


def _ct_folder_task(root: Path, name: str, data: bytes) -> Path:
    task = make_kaggle_task(root, {"001": tiny_case(0)}, ct="folder")
    (task / "CT" / name).write_bytes(data)
    write_label_pickle(task / "GroundTruth" / f"{name.split('.')[0]}.pkl", tiny_case(1)[1], SPACING)
    return task


def _msd_with_image(root: Path, data: bytes) -> Path:
    folder = make_msd(root / "Task03_Liver", {"liver_1": tiny_case(0)})
    (folder / "imagesTr" / "liver_1.nii.gz").write_bytes(data)
    return folder


def png_of_zeros(path: Path, width: int, height: int, rows: int | None = None) -> Path:
    """A greyscale PNG declaring ``width`` x ``height`` pixels, ``rows`` rows of zeros written (all by default),
    compressed row by row: a decompression bomb without holding it in memory."""
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    deflate, row, idat = zlib.compressobj(9), bytes(width + 1), bytearray()  # filter byte 0, then the pixels
    for _ in range(height if rows is None else rows):
        idat += deflate.compress(row)
    idat += deflate.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b""))
    return path


def _folders2d_with_image(root: Path, width: int, height: int, rows: int | None) -> Path:
    folder = root / "pngs"
    png_of_zeros(folder / "images" / "a.png", width, height, rows)
    write_image(folder / "masks" / "a.png", np.zeros((4, 4), np.uint8))
    return folder


def _zip_declaring(root: Path) -> Path:
    task = _kaggle_plus_member(root, "002.nii", nifti_bytes(tiny_case(1)[0]))
    patch_zip_member(task / "CT.zip", "002.nii", file_size=DECLARED_BYTES)
    return task


def _zip_bomb_declaring_small(root: Path) -> Path:
    """The bzip2 bomb whose headers claim the size of the NIfTI before its zeros: its compression ratio looks sane."""
    head = nifti_bytes(tiny_case(1)[0])
    task = _kaggle_plus_member(root, "002.nii", head, bomb=BOMB_BYTES)
    patch_zip_member(task / "CT.zip", "002.nii", file_size=len(head))
    return task


def _zip_encrypted(root: Path) -> Path:
    task = make_kaggle_task(root, {"001": tiny_case(0)})
    patch_zip_member(task / "CT.zip", "001.nii", flag_bits=0x1)
    return task


def _non_finite(root: Path) -> Path:
    raw = tiny_case(0)[0].astype(np.float32)
    raw[0, 0, 0], raw[1, 1, 1] = np.nan, np.inf
    return _ct_folder_task(root, "002.nii", nifti_image(raw, scaled=False).to_bytes())


HOSTILE: dict[str, Callable[[Path], Path]] = {
    "zip_parent_member_name": lambda root: _kaggle_plus_member(root, "../002.nii", nifti_bytes(tiny_case(1)[0])),
    "zip_absolute_member_name": lambda root: _kaggle_plus_member(root, "/002.nii", nifti_bytes(tiny_case(1)[0])),
    "zip_member_declares_4gb": _zip_declaring,
    "zip_bzip2_bomb": lambda root: _kaggle_plus_member(root, "002.nii", nifti_bytes(tiny_case(1)[0]),
                                                       bomb=BOMB_BYTES),
    "zip_bzip2_bomb_declaring_small": _zip_bomb_declaring_small,
    "zip_member_longer_than_header": lambda root: _kaggle_plus_member(
        root, "002.nii", nifti_bytes(tiny_case(1)[0]) + np.random.default_rng(0).bytes(4 << 20)),
    "zip_gzip_bomb_member": lambda root: _kaggle_plus_member(root, "002.nii.gz", _gzip_bomb()),
    "zip_encrypted_member": _zip_encrypted,
    "nifti_header_declares_huge_volume": lambda root: _ct_folder_task(
        root, "002.nii", nifti_with_dims(tiny_case(1)[0], (30000, 30000, 30000))),
    "nifti_gz_header_declares_huge_volume": lambda root: _msd_with_image(
        root, nifti_with_dims(tiny_case(0)[0], (30000, 30000, 30000), gz=True)),
    "nifti_gz_header_declares_more_slices": lambda root: _msd_with_image(
        root, nifti_with_dims(tiny_case(0)[0], (10, 12, 8), gz=True)),
    "nifti_non_finite_voxels": _non_finite,
    "nifti_zero_slices": lambda root: _ct_folder_task(root, "002.nii", nifti_with_dims(tiny_case(1)[0], (10, 12, 0))),
    "png_bomb_header": lambda root: _folders2d_with_image(root, 50_000, 50_000, rows=4),
    "png_bomb_zeros": lambda root: _folders2d_with_image(root, 12_000, 12_000, rows=None),
}


def _gzip_bomb() -> bytes:
    """A .nii.gz of a tiny volume followed by ``BOMB_BYTES`` zeros, compressed chunk by chunk."""
    import zlib

    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    out = bytearray(deflate.compress(nifti_bytes(tiny_case(1)[0])))
    for _ in range(BOMB_BYTES >> 20):
        out += deflate.compress(bytes(1 << 20))
    return bytes(out + deflate.flush())


def read_dataset(path: Path) -> dict:
    """Open the dataset at ``path`` and read each case's header shape, then the case itself, as the audit and the
    cache build do. {"outcome": "loaded"}, or "refused" with the MedsegError's type, kind and message, or "crashed"
    with any other exception's type and message."""
    from medseg.data.sources import open_source
    from medseg.errors import MedsegError

    try:
        source = open_source("auto", path)
        for case_id in source.case_ids():
            source.shape(case_id)
            source.load(case_id)
    except MedsegError as err:
        return {"outcome": "refused", "error": type(err).__name__, "kind": getattr(err, "kind", None),
                "message": str(err)}
    except (Exception, MemoryError) as err:
        return {"outcome": "crashed", "error": type(err).__name__, "message": str(err)[:500]}
    return {"outcome": "loaded"}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of everything under ``folder``: what a read must leave unchanged."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def interruptible() -> None:
    """``preexec_fn`` for a child a test will Ctrl-C: SIGINT back to its default, so that Python installs its
    KeyboardInterrupt handler even when the test runner was started as a background job (which ignores SIGINT, and
    passes that on)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
