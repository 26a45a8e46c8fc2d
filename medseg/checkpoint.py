"""Self-describing checkpoints: atomic save, safe load (``torch.load(weights_only=True)``) with an integrity digest.

A checkpoint holds the weights and everything needed to use them: the resolved config, the preprocessing
settings, the label values, the split hash, the metrics at save time and the library versions. A sha256
digest over the weights and the metadata is stored with them, so a file edited after saving (or a file not
written by medseg) is refused with a one-line message instead of being half-used.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from medseg.errors import CheckpointError
from medseg.io_utils import atomic_path

FORMAT = "medseg-checkpoint"
VERSION = 1


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "segmentation-models-pytorch", "albumentations", "numpy", "mlflow", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    from medseg import __version__

    out["medseg"] = __version__
    return out


def _digest(state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write weights + meta atomically (temp file in the same folder, then rename). ``meta`` must be JSON-like."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = json.loads(json.dumps(meta, default=str))  # plain types only, so weights_only loading accepts it
    payload = {"format": FORMAT, "version": VERSION, "meta": meta, "state_dict": state, "sha256": _digest(state, meta)}
    path = Path(path)
    save_torch_atomic(path, payload)
    return path


class _RecordingSink:
    """The file ``torch.save`` writes to, keeping the first OSError of its writes: torch reports a write that failed
    (a full disk) as a RuntimeError of its own ("unexpected pos ..."), without the errno."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_torch_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file beside it, fsync, rename). A disk that fills up (or the
    file size limit) is one ``DiskFullError`` line naming ``path``; the previous file is left as it was.

    torch's own file writer reports a failed write without its errno ("unexpected pos ..."); when it fails, the
    object is written again through Python's file I/O (``_RecordingSink``), which keeps the OSError: the disk is still
    full then, and the write fails for its real reason (if it succeeds, the first failure was transient and the
    file is complete)."""
    with atomic_path(Path(path)) as tmp:
        try:
            torch.save(obj, tmp)
        except Exception as first:
            with open(tmp, "wb") as fh:
                sink = _RecordingSink(fh)
                try:
                    torch.save(obj, sink)
                except Exception:
                    if sink.error is not None:
                        raise sink.error from None  # atomic_path turns it into a DiskFullError naming ``path``
                    raise first from None


def update_checkpoint_meta(path: str | os.PathLike, updates: dict[str, Any]) -> dict[str, Any]:
    """Add or replace metadata keys of a verified checkpoint, weights untouched; re-digested and written atomically.
    Returns the new metadata."""
    ckpt = load_checkpoint(path)
    meta = json.loads(json.dumps({**ckpt["meta"], **updates}, default=str))
    state = ckpt["state_dict"]
    payload = {"format": FORMAT, "version": VERSION, "meta": meta, "state_dict": state, "sha256": _digest(state, meta)}
    save_torch_atomic(path, payload)
    return meta


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and verify a medseg checkpoint; returns {"meta": ..., "state_dict": ...}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{path}: refused: not a safe medseg checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: refused: not a medseg checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format version {payload.get('version')!r} (this medseg "
                              f"reads version {VERSION}{_written_by(payload.get('meta'))}); re-train it, or use the "
                              "medseg that wrote it")
    state, meta = payload.get("state_dict"), payload.get("meta")
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{path}: refused: malformed checkpoint (missing weights or metadata)")
    if _digest(state, meta) != payload.get("sha256"):
        raise CheckpointError(f"{path}: refused: integrity digest mismatch (file modified after it was saved)")
    return {"meta": meta, "state_dict": state}


def _written_by(meta: Any) -> str:
    """", written by medseg X" from a checkpoint's stored library versions, or "" when it does not say."""
    versions = meta.get("versions") if isinstance(meta, dict) else None
    return f", written by medseg {versions['medseg']}" if isinstance(versions, dict) and versions.get("medseg") else ""


def checkpoint_config(path: str | os.PathLike, meta: dict[str, Any] | None = None):
    """The resolved Config stored in a checkpoint (``meta["config"]``), validated against this code's config schema.

    ``meta`` is the checkpoint's already loaded metadata (loaded from ``path`` when None). A stored config that no
    longer validates (a key renamed or removed since it was saved) is a one-line ``CheckpointError`` naming the file,
    its format version against the one this medseg reads, and the first offending key.
    """
    from medseg.config import config_from_dict
    from medseg.errors import ConfigError

    meta = load_checkpoint(path)["meta"] if meta is None else meta
    version = f"checkpoint format version {VERSION}, this medseg reads version {VERSION}{_written_by(meta)}"
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: no stored config (meta['config']) ({version}); re-train it with this medseg")
    try:
        return config_from_dict(meta["config"], source="config", resolve=False)
    except ConfigError as err:
        raise CheckpointError(f"{path}: its stored config no longer validates against this medseg ({version}; "
                              f"re-train it, or use the medseg that wrote it): {err}") from None


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode, in its config's memory format, meta, Config) from a checkpoint alone; a colour one
    (``channel_mean`` in its preprocessing) standardises its input (``models.Standardised``)."""
    from medseg.models import build_model, memory_format

    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    cfg = checkpoint_config(path, meta)
    missing = [key for key in ("in_channels", "classes") if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)} "
                              f"(checkpoint format version {VERSION}{_written_by(meta)})")
    prep = meta.get("preprocessing") or {}
    stats = {"mean": prep["channel_mean"], "std": prep["channel_std"]} if "channel_mean" in prep else None
    model = build_model(cfg.model, in_channels=meta["in_channels"], classes=meta["classes"], channel_stats=stats)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model in its config "
                              f"({str(err).splitlines()[0]})") from None
    return model.to(device, memory_format=memory_format(cfg.training.channels_last)).eval(), meta, cfg
