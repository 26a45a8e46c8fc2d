"""Synthetic twin of Kaggle "Medical Image Segmentation" Task001 (liver tumour): phantom abdominal CT, evalseg layout.

``generate_task`` writes ``<out>/<task-name>/`` exactly as the real dataset is laid out
(../shared/docs/DATASET.md): ``CT.zip`` (bzip2 zip of int16 NIfTI volumes in Hounsfield units, plus a
``.keepkaggle`` member), ``GroundTruth/<id>.pkl`` (label 1 = tumour, no liver label), ``metadata.json`` and
``Predictions/<method>/<id>.pkl`` from simple reference methods that score differently.

Each case is drawn from its own seeded stream (``[seed, case index]``), rendered a few slices at a time in
millimetre coordinates (anatomy keeps its size whatever the grid), blurred (partial volume), given correlated
noise and streamed into the zip slice by slice. Memory stays at a few volumes' worth (see ``build_task``).
Same seed -> byte-identical files.

Axes: volumes are (X, Y, Z) in NIfTI (i, j, k) order with a positive diagonal affine (axis codes R, A, S), as the
real Task001 files in ../shared/data/evalseg have. Like their tumours (mean position at 0.2-0.4 of the i axis),
the liver sits at low i; read literally, both headers put it on the patient's left, so a viewer that honours the
affine shows the anatomy mirrored. Nothing here reorients: training, evaluation and written masks all stay in
the files' own (i, j, k) order. The spine sits at low j; axial slices are ``volume[:, :, k]``.

Modules: ``anatomy`` (``RANGES``, the one table of anatomical and acquisition ranges, and ``plan_case``),
``shapes`` (organ blobs, lesions, vessels, textures, ``CasePlan``), ``render`` (phantom, blur, noise),
``methods`` (reference predictions), ``writer`` (NIfTI, zip, pickles, the task folder), ``cli``.

CLI: ``python -m medseg.data.synthetic --out data/synthetic [--cases 40] [--size 128] [--slices 24 48]
[--seed 0] [--task-name Task900_SynthLiverTumor] [--methods threshold,perturbed] [--force]``; exit 2 on a bad
argument or an existing task folder without ``--force`` (``medseg.cli.run_cli``).
"""
from __future__ import annotations

from medseg.data.synthetic.anatomy import (
    CHANCES,
    LESION_FREE_FRACTION,
    RANGES,
    TINY_LESION_VOXELS,
    case_ids,
    plan_case,
)
from medseg.data.synthetic.cli import main
from medseg.data.synthetic.methods import METHODS, predict_perturbed, predict_threshold
from medseg.data.synthetic.render import RenderedCase, add_noise, render_case
from medseg.data.synthetic.render import _render_chunk as _render_chunk  # private: tests render single slices
from medseg.data.synthetic.shapes import Blob, CasePlan, Lesion, Texture, Vessel
from medseg.data.synthetic.shapes import _Grid as _Grid  # private: likewise
from medseg.data.synthetic.writer import (
    DEFAULT_METHODS,
    DEFAULT_TASK_NAME,
    GENERATOR_VERSION,
    TaskSummary,
    build_task,
    generate_task,
)

__all__ = [
    "CHANCES", "DEFAULT_METHODS", "DEFAULT_TASK_NAME", "GENERATOR_VERSION", "LESION_FREE_FRACTION", "METHODS",
    "RANGES", "TINY_LESION_VOXELS", "Blob", "CasePlan", "Lesion", "RenderedCase", "TaskSummary", "Texture", "Vessel",
    "add_noise", "build_task", "case_ids", "generate_task", "main", "plan_case", "predict_perturbed",
    "predict_threshold", "render_case",
]
