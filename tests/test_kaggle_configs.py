"""The shipped Kaggle configs at real size: a synthetic task of 512x512 CT volumes in the Kaggle layout goes through
``configs/kaggle_task001_liver_tumor.yaml`` and ``configs/kaggle_task003_multiorgan.yaml`` unchanged but for the
data's location, one short epoch and, for the multi-organ config, the twin's one label: train.py, then eval.py at the
original resolution, then infer.py writing a mask in the CT's geometry. Slow (`make test-slow`): a few minutes."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.sources import open_source
from medseg.data.synthetic import generate_task

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CASES = 5  # task003 validates one fold of five: every fold needs a case
SLICES = (40, 48)


@pytest.fixture(scope="module")
def real_size_task(tmp_path_factory) -> Path:
    return generate_task(tmp_path_factory.mktemp("kaggle"), cases=CASES, size=512, slices=SLICES, seed=0)


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=1200)
    assert proc.returncode == 0, (script, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.mark.parametrize("config", ["kaggle_task001_liver_tumor.yaml", "kaggle_task003_multiorgan.yaml"])
def test_kaggle_config_trains_evaluates_and_infers_at_real_size(config, real_size_task, tmp_path):
    sets = [f"dataset.path={real_size_task.parent}", f"dataset.task={real_size_task.name}",
            f"dataset.cache_dir={tmp_path / 'cache'}", "training.epochs=1", "training.samples_per_epoch=32",
            f"output.run_dir={tmp_path / 'runs'}", f"output.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    if "multiorgan" in config:
        sets.append("dataset.labels=[1]")  # the twin draws the tumour label only
    args = ["--config", str(ROOT / "configs" / config)] + [a for s in sets for a in ("--set", s)]
    train = run("train.py", *args, "--quiet", cwd=tmp_path)
    ckpt = Path(next(line.split(":", 1)[1].strip() for line in train.stdout.splitlines()
                     if line.startswith("checkpoint:")))
    assert ckpt.is_file()

    run("eval.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "eval"), cwd=tmp_path)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["summary"]["n_cases"] >= 1 and 0.0 <= summary["summary"]["dice"] <= 1.0
    per_case = json.loads((tmp_path / "eval" / "per_case.json").read_text())
    assert {row["case_id"] for row in per_case} <= set(open_source("kaggle", real_size_task).case_ids())

    case = per_case[0]["case_id"]
    out = run("infer.py", "--ckpt", str(ckpt), "--input", str(real_size_task), "--case", case,
              "--out", str(tmp_path / "preds"), cwd=tmp_path)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    mask = nib.load(record["mask"])
    with zipfile.ZipFile(real_size_task / "CT.zip") as zf:
        member = next(n for n in zf.namelist() if n.startswith(f"{case}.nii"))
        ct = nib.Nifti1Image.from_bytes(zf.read(member))
    assert mask.shape == ct.shape and mask.shape[:2] == (512, 512) and SLICES[0] <= mask.shape[2] <= SLICES[1]
    assert np.allclose(mask.affine, ct.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
