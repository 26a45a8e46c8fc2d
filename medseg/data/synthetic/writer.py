"""Writing: a whole task folder, case by case (metadata.json, CT.zip of int16 NIfTI streamed slice by slice,
GroundTruth and Predictions pickles), built in a hidden sibling folder and renamed into place."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from medseg.data.evalseg_pickle import write_label_pickle
from medseg.data.synthetic.anatomy import TINY_LESION_VOXELS, _task_roles, case_ids, plan_case
from medseg.data.synthetic.methods import METHODS
from medseg.data.synthetic.render import add_noise, render_case
from medseg.data.synthetic.shapes import CasePlan
from medseg.errors import ConfigError, UsageError
from medseg.io_utils import atomic_path, atomic_write_text

DEFAULT_TASK_NAME = "Task900_SynthLiverTumor"
DEFAULT_METHODS = ("threshold", "perturbed")
# Bump whenever the same arguments would give different bytes, so caches keyed on metadata notice.
GENERATOR_VERSION = 3

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # earliest zip timestamp: fixed so the archive does not depend on the clock
_NIFTI_VOX_OFFSET = 352  # 348-byte header + 4-byte "no extensions" flag


def _nifti_header(plan: CasePlan) -> bytes:
    """The 352 bytes before the voxels of an uncompressed single-file NIfTI-1 holding int16 HU."""
    header = nib.Nifti1Header()
    header.set_data_shape(plan.shape)
    header.set_data_dtype(np.int16)
    header.set_qform(plan.affine(), code=1)  # 1 = scanner coordinates, as CT exports use
    header.set_sform(plan.affine(), code=1)
    header.set_zooms(plan.spacing)
    header.set_xyzt_units("mm", "sec")
    header["vox_offset"] = _NIFTI_VOX_OFFSET
    header["descrip"] = b"medseg synthetic CT"
    return header.binaryblock + b"\x00" * (_NIFTI_VOX_OFFSET - len(header.binaryblock))


def _zip_info(name: str, compress_type: int, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = compress_type
    info.external_attr = 0o644 << 16
    info.file_size = size  # known up front, so zipfile writes zip64 headers when a member passes 2 GiB
    return info


def _write_ct_member(zf: zipfile.ZipFile, name: str, image: np.ndarray, plan: CasePlan) -> None:
    """Stream ``image`` float32 (X, Y, Z) of whole HU values into ``zf`` as an int16 NIfTI, one slice at a time."""
    header = _nifti_header(plan)
    nx, ny, nz = image.shape
    with zf.open(_zip_info(name, zipfile.ZIP_BZIP2, len(header) + 2 * nx * ny * nz), "w") as member:
        member.write(header)
        for k in range(nz):
            # NIfTI stores i fastest: the C-order bytes of the transposed slice.
            member.write(np.ascontiguousarray(image[:, :, k].T).astype("<i2").tobytes())


def _metadata(task_name: str, cases: int, size: int, slices: tuple[int, int], seed: int) -> dict:
    """metadata.json in the real Task001's shape, plus the generator's arguments for provenance."""
    return {
        "description": "Synthetic liver tumour CT: phantom twin of Kaggle Medical Image Segmentation Task001 "
                       "(medseg.data.synthetic); not patient data",
        "labels": {"0": "background", "1": "tumor"},
        "licence": "CC-BY",
        "modality": {"0": "CT"},
        "name": task_name,
        "reference": "medseg.data.synthetic",
        "release": f"synthetic-{GENERATOR_VERSION}",
        "synthetic": {"cases": cases, "generator_version": GENERATOR_VERSION, "seed": seed, "size": size,
                      "slices": list(slices)},
        "tensorImageSize": "4D",
    }


@dataclass(frozen=True)
class TaskSummary:
    """What ``build_task`` wrote."""

    task_dir: Path
    cases: int
    lesion_free: int
    tiny_lesion_cases: int  # cases with at least one 26-connected tumour component under TINY_LESION_VOXELS
    methods: tuple[str, ...]
    seconds: float

    def line(self) -> str:
        return (f"{self.task_dir}: {self.cases} cases ({self.lesion_free} lesion-free, {self.tiny_lesion_cases} with "
                f"lesions under {TINY_LESION_VOXELS} voxels), predictions of {', '.join(self.methods)}, "
                f"{self.seconds:.1f} s")


def _validate(cases: int, size: int, slices: tuple[int, int], task_name: str, methods: Sequence[str]) -> None:
    if cases < 1:
        raise ConfigError(f"cases: must be >= 1, got {cases}")
    if size < 32:
        raise ConfigError(f"size: must be >= 32 voxels, got {size}")
    if len(slices) != 2 or not 1 <= slices[0] <= slices[1]:
        raise ConfigError(f"slices: need MIN MAX with 1 <= MIN <= MAX, got {tuple(slices)}")
    if not task_name.startswith("Task") or Path(task_name).name != task_name:
        raise ConfigError(f"task_name: must be a folder name starting with 'Task' (readers discover Task*), "
                          f"got {task_name!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"methods: unknown {unknown or 'none given'}; choose from {sorted(METHODS)}")


def _occupied(target: Path) -> bool:
    return target.exists() and (not target.is_dir() or any(target.iterdir()))


def _refuse_overwrite(target: Path, force: bool) -> None:
    """UsageError (exit 2 on the command line) when ``target`` holds something ``--force`` does not allow replacing."""
    if _occupied(target) and not force:
        raise UsageError(f"{target}: already exists and is not empty; pass --force (force=True) to replace it")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: exists and is not a folder; remove it first")


def _swap_into_place(tmp: Path, target: Path, force: bool) -> None:
    """Move the finished folder ``tmp`` to ``target``. Replacing takes two renames (POSIX has no portable
    directory exchange), so readers see the old task, then for an instant none, then the new one: never a mix."""
    _refuse_overwrite(target, force)  # again: another process may have written it meanwhile
    if not _occupied(target):
        os.replace(tmp, target)  # rename over a missing or empty folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old)


def build_task(out_dir: str | os.PathLike, *, cases: int = 40, size: int = 128, slices: tuple[int, int] = (24, 48),
               seed: int = 0, task_name: str = DEFAULT_TASK_NAME, methods: Sequence[str] = DEFAULT_METHODS,
               force: bool = False) -> TaskSummary:
    """Write ``<out_dir>/<task_name>/`` (see ``medseg.data.synthetic``) one case at a time and return what was written.

    Volumes are (size, size, Z) with Z drawn per case in ``slices`` (inclusive). The task is built in a hidden
    sibling folder and renamed into place, so an interrupted run leaves nothing half-written under the task name.
    Raises UsageError (a MedsegError) if the task folder exists and is not empty, unless ``force``.
    """
    start = time.perf_counter()
    slices = (int(slices[0]), int(slices[1]))
    methods = tuple(dict.fromkeys(methods))  # drop repeats, keep order
    _validate(cases, size, slices, task_name, methods)
    out_dir = Path(out_dir)
    target = out_dir / task_name
    _refuse_overwrite(target, force)  # before minutes of work, not after
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task_name}.", suffix=".partial", dir=out_dir))
    try:
        lesion_free, tiny = _write_task(tmp, cases=cases, size=size, slices=slices, seed=seed, task_name=task_name,
                                        methods=methods)
        _make_readable(tmp)
        _swap_into_place(tmp, target, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TaskSummary(target, cases, lesion_free, tiny, methods, time.perf_counter() - start)


def _make_readable(root: Path) -> None:
    """mkdtemp and mkstemp (behind the atomic writes) create owner-only entries; a dataset should read like a copy."""
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _write_task(task_dir: Path, *, cases: int, size: int, slices: tuple[int, int], seed: int, task_name: str,
                methods: tuple[str, ...]) -> tuple[int, int]:
    """Fill ``task_dir``; returns (lesion-free cases, cases with a tiny lesion) as found in the written labels."""
    atomic_write_text(task_dir / "metadata.json",
                      json.dumps(_metadata(task_name, cases, size, slices, seed), indent=4, sort_keys=True) + "\n")
    free, forced_tiny = _task_roles(seed, cases)
    n_free = n_tiny = 0
    # One writer thread streams case i into the zip (bz2 releases the GIL) while case i + 1 is drawn: the archive
    # costs about as much as everything else. At most one member is in flight, so at most two cases are in memory.
    with atomic_path(task_dir / "CT.zip") as zip_tmp, zipfile.ZipFile(zip_tmp, "w") as zf, \
            ThreadPoolExecutor(max_workers=1) as writer:
        # The real archive carries a password-protected .keepkaggle member; a plain one exercises the same skip.
        zf.writestr(_zip_info(".keepkaggle", zipfile.ZIP_STORED, 0), b"")
        pending: Future | None = None
        for index, case_id in enumerate(case_ids(cases)):
            rng = np.random.default_rng([seed, index])
            plan = plan_case(rng, case_id, size=size, slices=slices, with_lesions=index not in free,
                             force_tiny=index in forced_tiny)
            case = render_case(plan)
            add_noise(case.image, plan, rng)
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_ct_member, zf, f"{case_id}.nii", case.image, plan)
            write_label_pickle(task_dir / "GroundTruth" / f"{case_id}.pkl", case.label, plan.spacing)
            sizes = case.lesion_sizes()
            n_free += not sizes
            n_tiny += any(s < TINY_LESION_VOXELS for s in sizes)
            for name in methods:
                # One stream per (case, method), keyed by name: adding a method leaves the others' output unchanged.
                method_rng = np.random.default_rng([seed, index, zlib.crc32(name.encode())])
                write_label_pickle(task_dir / "Predictions" / name / f"{case_id}.pkl",
                                   METHODS[name](case, method_rng), plan.spacing)
            del case  # the writer keeps the image alive until its member is written; the rest goes now
        if pending is not None:
            pending.result()
    return n_free, n_tiny


def generate_task(out_dir: str | os.PathLike, *, cases: int = 40, size: int = 128, slices: tuple[int, int] = (24, 48),
                  seed: int = 0, task_name: str = DEFAULT_TASK_NAME, methods: Sequence[str] = DEFAULT_METHODS,
                  force: bool = False) -> Path:
    """Write the synthetic task and return its folder, ``<out_dir>/<task_name>``. See ``build_task``."""
    return build_task(out_dir, cases=cases, size=size, slices=slices, seed=seed, task_name=task_name,
                      methods=methods, force=force).task_dir
