"""Checkpoint + input volume/image -> mask with the input's geometry; the one batched slice prediction.

``slice_logits`` runs a normalised (Z, S, S) volume through a model in batches of 2.5D slices (with mirror TTA):
training's validation (``predict_volume``, on the cached resolution) and ``Predictor`` (eval.py, infer.py) both
predict through it. The ``Predictor``'s preprocessing is the checkpoint's own (window or percentiles, in-plane size,
2.5D context), run through the same functions that built the training cache; probabilities are resized back to each
slice's original size before thresholding, so masks line up voxel for voxel with the input.
A colour checkpoint (``channels`` 3 in its preprocessing) takes (X, Y, Z, 3) images, as the 2D reader gives them with
dataset.channels rgb; an image with another number of channels is a one-line DataError naming it (``check_channels``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from medseg import postprocess
from medseg.checkpoint import model_from_checkpoint
from medseg.data.cache import make_normaliser, resize_slice
from medseg.data.dataset import stack_context
from medseg.errors import DataError, UsageError
from medseg.models import autocast, memory_format, predict_classes, prediction_precision
from medseg.tta import mirrored_logits, mirrors_from_augment

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")


# ----------------------------------------------------------------------------------------- slice batches


@torch.no_grad()
def slice_logits(model: torch.nn.Module, volume: np.ndarray, *, context: int, device: torch.device, batch_size: int,
                 precision: str = "fp32", channels_last: bool = False,
                 tta_axes: list[list[int]] | None = None) -> Iterator[tuple[range, torch.Tensor]]:
    """(Z, S, S) normalised volume -> per batch of consecutive slices: (their z indices, (n, C, S, S) float32
    logits), each slice stacked with ``context`` neighbours on either side (2k+1 channels; a colour (Z, 3, S, S)
    volume: 3 (2k+1)).

    ``tta_axes`` (mirrors, see ``medseg.tta``) averages probabilities over the identity and those mirrors.
    ``precision`` (resolved, ``models.resolve_precision``) and ``channels_last`` (the batches' memory format: the
    model's own, ``models.memory_format``) as the caller's model runs.
    """
    model.eval()
    n = volume.shape[0]
    for start in range(0, n, batch_size):
        zs = range(start, min(n, start + batch_size))
        x = torch.from_numpy(np.stack([stack_context(volume, z, context) for z in zs]))
        x = x.to(device, memory_format=memory_format(channels_last))
        with autocast(device, precision):
            logits = model(x).float()
            if tta_axes:
                logits = mirrored_logits(model, x, logits, tta_axes)
        yield zs, logits


@torch.no_grad()
def predict_volume(model: torch.nn.Module, volume: np.ndarray, *, context: int, device: torch.device, batch_size: int,
                   threshold: float = 0.5, precision: str = "fp32", channels_last: bool = False,
                   tta_axes: list[list[int]] | None = None,
                   target: np.ndarray | None = None, loss_fn=None) -> tuple[np.ndarray, float | None]:
    """(Z, S, S) (or colour (Z, C, S, S)) normalised volume -> (Z, S, S) uint8 class map, slice batches through the
    model (``slice_logits``).

    With ``target`` (class indices) and ``loss_fn``, also returns the mean loss over slices.
    """
    n = volume.shape[0]
    out = np.empty((n, *volume.shape[-2:]), np.uint8)
    with_loss = target is not None and loss_fn is not None
    loss_sum = 0.0
    for zs, logits in slice_logits(model, volume, context=context, device=device, batch_size=batch_size,
                                   precision=precision, channels_last=channels_last, tta_axes=tta_axes):
        if with_loss:
            y = torch.from_numpy(np.ascontiguousarray(target[zs.start:zs.stop]).astype(np.int64)).to(device)
            loss_sum += float(loss_fn(logits, y)) * len(zs)
        out[zs.start:zs.stop] = predict_classes(logits, threshold).cpu().numpy()
    return out, (loss_sum / n if with_loss else None)


# ------------------------------------------------------------------------------------------- predictor


class Predictor:
    """A loaded checkpoint that turns (X, Y, Z) float32 volumes into (X, Y, Z) uint8 label volumes."""

    def __init__(self, ckpt: str | Path, *, device: str | None = None, batch_size: int = 16, flip_tta: bool = False,
                 postprocess: bool = True):
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available (leave --device out to use the CPU)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta, self.cfg = model_from_checkpoint(ckpt, device=self.device)
        self.ckpt = Path(ckpt)
        self.settings: dict[str, Any] = self.meta["preprocessing"]
        self.context = int(self.settings.get("context_slices", 0))
        self.channels = int(self.settings.get("channels", 1))  # of an input image: 3 for a colour checkpoint
        self.labels = [int(v) for v in self.meta["labels"]]
        self.batch_size = batch_size
        self.flip_tta = flip_tta
        # the mirrors training showed the model (checkpoint metadata; derived from its stored config when older)
        self.trained_mirrors = (self.meta["tta_axes"] if "tta_axes" in self.meta
                                else mirrors_from_augment(self.cfg.augment))
        self.tta_axes = [list(m) for m in self.trained_mirrors] if flip_tta else []
        if flip_tta and not self.tta_axes:
            logging.getLogger(__name__).warning(
                "%s: --tta: trained without flips (augment: %s), so no mirror is one it has seen; predicting without "
                "TTA", self.ckpt, ", ".join(a.name for a in self.cfg.augment) or "none")
        self.threshold = self.cfg.training.threshold
        # float32 on the CPU (a score does not depend on the CPU's bf16), the training precision on CUDA
        self.precision = prediction_precision(self.cfg.training, self.device)
        self.channels_last = self.cfg.training.channels_last  # the model's memory format (model_from_checkpoint)
        # post-processing chosen on validation after training (medseg.postprocess); None: the checkpoint has none
        self.postprocessing = self.meta.get("postprocessing") if postprocess else None
        # class index -> raw label value (class 0 is background)
        self.class_to_label = np.array([0, *self.labels], dtype=np.uint8)

    def check_channels(self, image: np.ndarray, where: str = "input") -> None:
        """DataError (one line naming ``where``, e.g. "<file> (case <id>)") when ``image`` ((X, Y, Z) or colour
        (X, Y, Z, C)) has other channels than the checkpoint was trained on."""
        have = image.shape[3] if image.ndim == 4 else 1
        if have == self.channels:
            return
        if self.channels > 1:
            fix = ("give it the colour image, or use a checkpoint trained with dataset.channels: gray")
        else:
            fix = "read the image with dataset.channels: gray (luma), or use a checkpoint trained in colour"
        raise DataError(f"{where}: the image has {have} channel{'s' * (have != 1)}, the checkpoint {self.ckpt} "
                        f"expects {self.channels} (dataset.channels: {'rgb' if self.channels > 1 else 'gray'}): "
                        f"{fix}")

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(X, Y, Z) raw intensities -> (Z, S, S) float32 in [0, 1], exactly as the training cache; a colour image
        (X, Y, Z, C) -> (Z, C, S, S)."""
        norm, _ = make_normaliser(image, self.settings)
        size = self.settings["image_size"]
        # float16 like the cache, so a checkpoint sees exactly the values it was trained and validated on
        planes = np.stack([resize_slice(norm(image[:, :, z]), size, is_label=False) for z in range(image.shape[2])])
        if planes.ndim == 4:  # colour: (Z, S, S, C) -> (Z, C, S, S), the cache's layout
            planes = planes.transpose(0, 3, 1, 2)
        return planes.astype(np.float16).astype(np.float32)

    def reads_cache(self, cache) -> bool:
        """Whether ``cache`` (a ``SliceCache``) holds exactly what ``preprocess`` makes of its cases' images (same
        pixel settings: version, modality, window, percentiles, size, channels): eval then reads those planes
        instead of decoding and preprocessing every image again."""
        return all(self.settings.get(key) == cache.settings.get(key) for key in {*cache.settings, "channels"})

    @torch.no_grad()
    def batch_probabilities(self, image: np.ndarray) -> Iterator[tuple[range, torch.Tensor]]:
        """Per batch of slices: (their z indices, (n, C, X, Y) probabilities at the input's in-plane size)."""
        return self.planes_probabilities(self.preprocess(image), tuple(image.shape[:2]))

    @torch.no_grad()
    def planes_probabilities(self, planes: np.ndarray, size: tuple[int, int]) -> Iterator[tuple[range, torch.Tensor]]:
        """``batch_probabilities`` of preprocessed (Z, S, S) planes (colour (Z, C, S, S)), at in-plane ``size``."""
        for zs, logits in slice_logits(self.model, planes, context=self.context, device=self.device,
                                       batch_size=self.batch_size, precision=self.precision,
                                       channels_last=self.channels_last, tta_axes=self.tta_axes):
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
            if size != tuple(probs.shape[2:]):
                probs = torch.nn.functional.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            yield zs, probs

    def probabilities(self, image: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (z, probabilities (C, X, Y)) per slice at the input's in-plane size, computed in batches."""
        for zs, probs in self.batch_probabilities(image):
            for i, z in enumerate(zs):
                yield z, probs[i].cpu().numpy()

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(X, Y, Z) float32 (colour: (X, Y, Z, C)) -> (X, Y, Z) uint8 raw label values (the task's own label
        numbering)."""
        if image.ndim not in (3, 4):
            raise DataError(f"expected an (X, Y, Z) volume, got shape {image.shape}")
        self.check_channels(image)
        return self.predict_planes(self.preprocess(image), image.shape[:3])

    def predict_planes(self, planes: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        """``predict`` of a volume already preprocessed (``preprocess``, or the slice cache of the same settings:
        ``reads_cache``) into (Z, S, S) planes: the (X, Y, Z) uint8 label volume of ``shape``."""
        if planes.shape[0] != shape[2]:
            raise DataError(f"{planes.shape[0]} preprocessed slices for a volume of shape {tuple(shape)}")
        out = np.zeros(tuple(shape), np.uint8)
        for zs, probs in self.planes_probabilities(planes, tuple(shape[:2])):
            classes = predict_classes(probs, self.threshold, probabilities=True).cpu().numpy()  # (n, X, Y)
            out[:, :, zs.start:zs.stop] = np.moveaxis(self.class_to_label[classes], 0, 2)
        if postprocess.active(self.postprocessing):
            size = int(self.postprocessing.get("image_size", self.settings["image_size"]))
            out = postprocess.apply(out, self.postprocessing, voxel_scale=shape[0] * shape[1] / size**2)
        return out


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class InputItem:
    """One thing to segment: its id, float32 (X, Y, Z) image (colour: (X, Y, Z, 3)), and how to write a mask like
    it."""

    name: str
    image: np.ndarray
    kind: str  # "nifti" | "image"
    reference: Any  # nibabel image (NIfTI) or the image path (2D)


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", *NIFTI_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_nifti(path: Path) -> InputItem:
    from medseg.data.sources.common import load_nifti, to_image

    nii = load_nifti(path, source=str(path))
    return InputItem(_stem(path), to_image(nii.array, source=str(path)), "nifti", nii)


def read_image(path: Path, channels: int = 1) -> InputItem:
    """An image file as a depth-1 volume: luma (X, Y, 1) for ``channels`` 1, else as it is: colour (X, Y, 1, 3), or
    (X, Y, 1) for a greyscale file (which a colour checkpoint refuses)."""
    from medseg.data.sources.folders2d import read_colour, read_gray

    if channels == 1:
        return InputItem(_stem(path), read_gray(path), "image", path)
    image = read_colour(path)
    return InputItem(_stem(path), image[:, :, None, :] if image.shape[-1] > 1 else image, "image", path)


def iter_inputs(path: str | Path, case_ids: list[str] | None = None, channels: int = 1) -> Iterator[InputItem]:
    """A NIfTI file, an image file, a folder of either, or a Kaggle task folder (all or ``case_ids``); images read
    for a checkpoint of ``channels`` (``read_image``)."""
    path = Path(path)
    if path.is_dir() and ((path / "CT.zip").exists() or (path / "CT").is_dir()) and (path / "metadata.json").exists():
        from medseg.data.sources import open_source

        source = open_source("kaggle", path, allow_missing=True)
        for cid in case_ids or source.image_ids():
            image, nifti = source.load_image(cid)
            yield InputItem(cid, image, "nifti", nifti)
        return
    if case_ids:
        raise DataError(f"{path}: --case applies to a Kaggle task folder only")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _has_suffix(p, NIFTI_SUFFIXES + IMAGE_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no NIfTI or image files found")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder")
    for f in files:
        if _has_suffix(f, NIFTI_SUFFIXES):
            yield read_nifti(f)
        elif _has_suffix(f, IMAGE_SUFFIXES):
            yield read_image(f, channels)
        else:
            raise DataError(f"{f}: unsupported input type (use .nii, .nii.gz, or an image)")


def write_mask(item: InputItem, mask: np.ndarray, out_dir: Path, *, binary_255: bool) -> Path:
    """Write ``mask`` with the input's geometry: NIfTI with the input's affine and shape, or an image of its size."""
    from medseg.io_utils import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    if item.kind == "nifti":
        import nibabel as nib

        ref = item.reference
        data = mask.reshape(ref.shape) if int(np.prod(ref.shape)) == mask.size else mask
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = image_class(data.astype(np.uint8), ref.affine, header)
        img.header.set_slope_inter(1, 0)
        img.header.set_intent(0)  # a label map, not whatever the input declared
        img.header["cal_min"], img.header["cal_max"] = 0, 0  # the input's display range (e.g. 300 HU) would hide 0/1
        img.header["descrip"] = b"medseg mask"
        path = out_dir / f"{item.name}.nii.gz"
        with atomic_path(path, suffix=".nii.gz") as tmp:
            nib.save(img, str(tmp))
        return path
    from PIL import Image

    plane = mask[:, :, 0]
    if binary_255:
        plane = (plane > 0).astype(np.uint8) * 255  # visible 0/255 masks; the folders2d reader maps them back to 0/1
    path = out_dir / f"{item.name}_mask.png"
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(plane).save(tmp, format="PNG")
    return path


def run_inference(ckpt: str | Path, input_path: str | Path, out_dir: str | Path, *, case_ids: list[str] | None = None,
                  batch_size: int = 16, flip_tta: bool = False, overlays: bool = True, device: str | None = None,
                  postprocess: bool = True) -> list[dict[str, Any]]:
    """Segment every input; write masks (+ overlay PNGs). Returns one record per input."""
    from medseg.plots import overlay_png, pick_slice

    predictor = Predictor(ckpt, device=device, batch_size=batch_size, flip_tta=flip_tta, postprocess=postprocess)
    out_dir = Path(out_dir)
    records = []
    for item in iter_inputs(input_path, case_ids, predictor.channels):
        where = f"{item.reference} (case {item.name})" if item.kind == "image" else f"case {item.name}"
        predictor.check_channels(item.image, where)
        mask = predictor.predict(item.image)
        path = write_mask(item, mask, out_dir, binary_255=len(predictor.labels) == 1)
        record = {"input": item.name, "mask": str(path), "shape": list(mask.shape),
                  "foreground_voxels": int(np.count_nonzero(mask))}
        if overlays:
            z = pick_slice(np.moveaxis(mask, 2, 0), np.moveaxis(mask, 2, 0))
            norm, _ = make_normaliser(item.image, predictor.settings)
            record["overlay"] = str(overlay_png(norm(item.image[:, :, z]), None, mask[:, :, z],
                                                out_dir / "overlays" / f"{item.name}_z{z:03d}.png",
                                                title=f"{item.name}, slice {z}: red prediction"))
        records.append(record)
    return records
