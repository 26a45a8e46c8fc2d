"""Model factory over segmentation_models_pytorch.create_model."""
from __future__ import annotations

import torch

from medseg.errors import ConfigError


def n_classes(labels: list[int]) -> int:
    """Output channels: 1 (sigmoid) for one foreground label, else background + one per label (softmax)."""
    return 1 if len(labels) == 1 else len(labels) + 1


def build_model(model_cfg, *, in_channels: int, classes: int) -> torch.nn.Module:
    """smp model from the config; offline by default (``encoder_weights: null``)."""
    import segmentation_models_pytorch as smp

    kwargs = dict(model_cfg.kwargs)
    kwargs["encoder_depth"] = model_cfg.encoder_depth
    if model_cfg.decoder_channels is not None:
        kwargs["decoder_channels"] = list(model_cfg.decoder_channels)
    try:
        return smp.create_model(model_cfg.arch, encoder_name=model_cfg.encoder, encoder_weights=model_cfg.encoder_weights,
                                in_channels=in_channels, classes=classes, **kwargs)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"model: smp.create_model({model_cfg.arch}, {model_cfg.encoder}, {kwargs}): {' '.join(str(err).split())[:400]}") from None


def predict_classes(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(N, C, H, W) logits -> (N, H, W) class indices: sigmoid > threshold for C == 1, argmax otherwise."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0]) > threshold).to(torch.uint8)
    return logits.argmax(dim=1).to(torch.uint8)
