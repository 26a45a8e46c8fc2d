"""Model factory over segmentation_models_pytorch.create_model, mixed precision, and logits -> class maps."""
from __future__ import annotations

import torch

from medseg.errors import ConfigError


def n_classes(labels: list[int]) -> int:
    """Output channels: 1 (sigmoid) for one foreground label, else background + one per label (softmax)."""
    return 1 if len(labels) == 1 else len(labels) + 1


class Standardised(torch.nn.Module):
    """A segmentation model whose input is standardised per channel first, ``(x - mean) / std``: colour input, with
    the training split's statistics (``SliceCache.channel_stats``). They are buffers, so the checkpoint's weights
    carry them and every prediction (validation, eval.py, infer.py, robustness, TTA) applies them."""

    def __init__(self, model: torch.nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def build_model(model_cfg, *, in_channels: int, classes: int,
                channel_stats: dict[str, list[float]] | None = None) -> torch.nn.Module:
    """smp model from the config; offline by default (``encoder_weights: null``). ``channel_stats`` ({"mean",
    "std"} per image channel, repeated over the 2.5D context's slices): wrapped in ``Standardised``."""
    import segmentation_models_pytorch as smp

    kwargs = dict(model_cfg.kwargs)
    kwargs["encoder_depth"] = model_cfg.encoder_depth
    if model_cfg.decoder_channels is not None:
        kwargs["decoder_channels"] = list(model_cfg.decoder_channels)
    try:
        model = smp.create_model(model_cfg.arch, encoder_name=model_cfg.encoder,
                                 encoder_weights=model_cfg.encoder_weights, in_channels=in_channels, classes=classes,
                                 **kwargs)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        call = f"smp.create_model({model_cfg.arch}, {model_cfg.encoder}, {kwargs})"
        raise ConfigError(f"model: {call}: {' '.join(str(err).split())[:400]}") from None
    drop_unused_encoder_stages(model, in_channels)
    if channel_stats is None:
        return model
    per_slice = len(channel_stats["mean"])
    if in_channels % per_slice:
        raise ConfigError(f"model: {in_channels} input channels are not slices of {per_slice} channels each")
    repeat = in_channels // per_slice
    return Standardised(model, list(channel_stats["mean"]) * repeat, list(channel_stats["std"]) * repeat)


def drop_unused_encoder_stages(model: torch.nn.Module, in_channels: int) -> list[str]:
    """Replace encoder children that the forward pass never calls with Identity.

    With ``encoder_depth`` < 5, smp still builds every stage of a ResNet-style encoder (resnet18 at depth 4
    keeps its 8.4M-parameter ``layer4``): unused weights that would fill every checkpoint. Which children run
    is observed with forward hooks on one small input in eval mode (no gradients, no BatchNorm update).
    """
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return []
    called: set[str] = set()
    hooks = [child.register_forward_hook(lambda *_, name=name: called.add(name))
             for name, child in encoder.named_children()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, 64, 64))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    unused = [name for name, child in encoder.named_children()
              if name not in called and any(True for _ in child.parameters())]
    for name in unused:
        setattr(encoder, name, torch.nn.Identity())
    return unused


def native_bf16() -> bool:
    """bf16 in hardware (Ampere and later). ``is_bf16_supported()`` alone also says yes for emulated bf16 on
    T4/V100, where fp16 with a GradScaler is the fast path."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_native_bf16() -> bool:
    """bf16 in the CPU's instructions (AVX-512 BF16 or AMX tiles), where oneDNN's bf16 convolutions run natively;
    elsewhere they are emulated through float32."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(precision: str, device: torch.device, *, amp: bool = True) -> str:
    """``training.precision`` on this device: "fp32", "bf16" or "fp16" (CUDA without native bf16, with a
    GradScaler). ``auto``: bf16 where the hardware has it (CPU: ``cpu_native_bf16``), else fp32 on the CPU and fp16
    on CUDA. ``amp: false`` (the older switch) means fp32."""
    if not amp or precision == "fp32":
        return "fp32"
    if precision == "bf16":
        return "bf16"
    if device.type == "cuda":
        return "bf16" if native_bf16() else "fp16"
    return "bf16" if cpu_native_bf16() else "fp32"


def requested_device(training) -> torch.device:
    """The device a ``training`` config section asks for: ``cuda`` when said, or ``auto`` and CUDA is available."""
    want_cuda = training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if want_cuda else "cpu")


def training_precision(training) -> str:
    """``resolve_precision`` of a ``training`` config section on the device it asks for."""
    return resolve_precision(training.precision, requested_device(training), amp=training.amp)


def prediction_precision(training, device: torch.device) -> str:
    """The precision validation, eval.py and infer.py predict in: float32 on the CPU whatever the training precision,
    so a checkpoint scores the same on CPUs with and without bf16 (champion decisions compare those scores); the
    training precision on CUDA (autocast, as before)."""
    if device.type != "cuda":
        return "fp32"
    return resolve_precision(training.precision, device, amp=training.amp)


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (``resolve_precision``): off for fp32."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    """``training.channels_last`` as a torch memory format, for the model and every batch it sees."""
    return torch.channels_last if channels_last else torch.contiguous_format


def predict_classes(scores: torch.Tensor, threshold: float = 0.5, *, probabilities: bool = False) -> torch.Tensor:
    """(N, C, H, W) logits -> (N, H, W) class indices: sigmoid > threshold for C == 1, argmax otherwise.

    ``probabilities``: ``scores`` are already sigmoid / softmax outputs (e.g. resized to the input's size), so one
    channel is compared with the threshold as it is and several are argmaxed as probabilities."""
    if scores.shape[1] == 1:
        foreground = scores[:, 0] if probabilities else torch.sigmoid(scores[:, 0])
        return (foreground > threshold).to(torch.uint8)
    return scores.argmax(dim=1).to(torch.uint8)
