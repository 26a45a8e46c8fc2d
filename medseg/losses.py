"""Loss builder over smp.losses. Binary (1 output channel) or multi-class (softmax) by the number of labels."""
from __future__ import annotations

import torch
from torch import nn


class WeightedSum(nn.Module):
    """sum_i weight_i * loss_i(logits, target)."""

    def __init__(self, terms: list[tuple[float, nn.Module]]):
        super().__init__()
        self.weights = [w for w, _ in terms]
        self.terms = nn.ModuleList(t for _, t in terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * term(logits, target) for w, term in zip(self.weights, self.terms))


class _BinaryBCE(nn.Module):
    """smp's SoftBCEWithLogitsLoss on (N, 1, H, W) logits with (N, H, W) integer targets."""

    def __init__(self):
        super().__init__()
        from segmentation_models_pytorch.losses import SoftBCEWithLogitsLoss

        self.loss = SoftBCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target.unsqueeze(1).to(logits.dtype))


def build_loss(loss_cfg, classes: int) -> nn.Module:
    """loss(logits (N, C, H, W), target (N, H, W) int64 class indices) -> scalar."""
    from segmentation_models_pytorch import losses as L

    mode = L.BINARY_MODE if classes == 1 else L.MULTICLASS_MODE
    bce = _BinaryBCE() if classes == 1 else nn.CrossEntropyLoss()
    dice = L.DiceLoss(mode, from_logits=True)
    focal = L.FocalLoss(mode, gamma=loss_cfg.focal_gamma)
    name = loss_cfg.name
    if name == "bce":
        return WeightedSum([(1.0, bce)])
    if name == "dice":
        return WeightedSum([(1.0, dice)])
    if name == "bce_dice":
        return WeightedSum([(loss_cfg.bce_weight, bce), (loss_cfg.dice_weight, dice)])
    if name == "focal":
        return WeightedSum([(1.0, focal)])
    if name == "focal_dice":
        return WeightedSum([(loss_cfg.focal_weight, focal), (loss_cfg.dice_weight, dice)])
    if name == "tversky":
        return WeightedSum([(1.0, L.TverskyLoss(mode, alpha=loss_cfg.tversky_alpha, beta=loss_cfg.tversky_beta))])
    raise ValueError(f"unknown loss '{name}'")
