"""FLOPs of the benchmark's rows: ``torch.utils.flop_counter.FlopCounterMode`` on the real computation (the CPU
fused attention kernel counted with torch's formulas of the CUDA kernels), the FLOPs the answer needs (every sample
alone, unpadded), the sequence length after prompt insertion and the devices' peak FLOP/s for MFU."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mdpl.config import RunConfig

# Dense peak TFLOP/s by (GPU name fragment, precision); fp32 = plain FP32 (TF32 off, the PyTorch default).
PEAK_TFLOPS = {
    ("H200", "bf16-mixed"): 989.0, ("H200", "fp16-mixed"): 989.0, ("H200", "fp32"): 67.0, ("H200", "tf32"): 494.5,
    ("H100 PCIe", "bf16-mixed"): 756.0, ("H100 PCIe", "fp16-mixed"): 756.0, ("H100 PCIe", "fp32"): 51.0,
    ("H100 PCIe", "tf32"): 378.0,
    ("H100", "bf16-mixed"): 989.0, ("H100", "fp16-mixed"): 989.0, ("H100", "fp32"): 67.0, ("H100", "tf32"): 494.5,
    ("A100", "bf16-mixed"): 312.0, ("A100", "fp16-mixed"): 312.0, ("A100", "fp32"): 19.5, ("A100", "tf32"): 156.0,
}


def autocast(device: torch.device, precision: str):
    """torch.autocast for a mixed precision ('bf16-mixed', 'fp16-mixed'); nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Flops:
    """FLOPs of one batch, counted by FlopCounterMode: the evaluation forward and the training step."""

    forward: float
    train: float


def _fused_cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _fused_cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_sdpa_formulas() -> dict:
    """torch's flop formulas of the CUDA fused attention kernels, for the CPU fused kernel, which torch's
    FlopCounterMode does not count (it would report attention as free on the CPU)."""
    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {ops._scaled_dot_product_flash_attention_for_cpu: _fused_cpu_sdpa_flop,
            ops._scaled_dot_product_flash_attention_for_cpu_backward: _fused_cpu_sdpa_backward_flop}


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode (no display) that also counts the CPU fused attention kernel (`_cpu_sdpa_formulas`)."""
    return FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_formulas())


def count_flops(model: torch.nn.Module, config: RunConfig | Mapping, batch: dict, device: torch.device,
                precision: str) -> Flops:
    """FLOPs of `model` on `batch`, counted on the real computation the timed steps run (same precision):
    the evaluation forward (eval mode, inference_mode) and the training forward + task loss + backward (the
    optimizer update is elementwise: not counted). The gradients it makes are dropped; the mode is restored."""
    from mdpl.engine.losses import task_loss

    dataset = RunConfig.coerce(config).data.dataset
    was_training = model.training
    model.eval()
    with flop_counter() as forward, torch.inference_mode(), autocast(device, precision):
        model(batch)
    model.train()
    if hasattr(model, "set_frozen_modes"):
        model.set_frozen_modes()
    with flop_counter() as train:
        with autocast(device, precision):
            loss = task_loss(dataset, model(batch)["logits"], batch["label"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return Flops(float(forward.get_total_flops()), float(train.get_total_flops()))


def sequence_length(config: RunConfig | Mapping, batch: dict, model: torch.nn.Module) -> int:
    """Longest sequence after every prompt insertion: the joint sequence of a single-stream backbone (text, image
    [CLS], patches), else the image tower's ([CLS] + patches); with the method's `added_tokens`."""
    sizes = RunConfig.coerce(config).backbone
    method = model.prompt
    added = method.added_tokens(method.config, model.backbone.info)
    p = int(sizes.patch_size)
    if "joint" not in sizes.stream_widths:
        side = batch["image"].shape[-1]
        return (side // p) ** 2 + 1 + added.get("image", 0)
    hw = batch["image_sizes"].cpu()
    m = int((((hw[:, 0] + p - 1) // p) * ((hw[:, 1] + p - 1) // p)).max())
    return batch["text_ids"].shape[1] + 1 + m + added.get("joint", 0)


def peak_tflops(device: torch.device, precision: str, override: float | None, tf32: bool) -> float | None:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and tf32 else precision
    for (frag, prec), value in PEAK_TFLOPS.items():  # dict order: specific fragments first
        if frag in name and prec == key:
            return value
    return None


def single_samples(batch: dict, cut_text: bool) -> list[dict]:
    """Each sample of `batch` alone, its text cut to its own length: the inputs of the computation the answer
    needs (no padding of any kind, a dropped modality not computed)."""
    out = []
    for i in range(batch["missing_type"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        length = max(2, int(one["text_masks"].sum()))
        one["text_len_host"] = length
        if "image_sizes_host" in batch:
            one["image_sizes_host"] = batch["image_sizes_host"][i:i + 1]
        if cut_text:   # an encoder reading texts of any length (the card's dynamic_text_padding): the text itself;
            # the fixed-length ones keep their ids, cut by the model
            one["text_ids"], one["text_masks"] = one["text_ids"][:, :length], one["text_masks"][:, :length]
        out.append(one)
    return out


def needed_flops(model, config: RunConfig | Mapping, batch: dict, device: torch.device, precision: str) -> Flops:
    """FLOPs of the same model on every sample alone and unpadded (`single_samples`), summed: what the answer
    needs, against which the executed FLOPs of the batched step are compared."""
    run = RunConfig.coerce(config)
    counts = [count_flops(model, run, one, device, precision)
              for one in single_samples(batch, cut_text=run.card.dynamic_text_padding
                                        and not model.prompt.fixed_segment_lengths)]
    return Flops(sum(c.forward for c in counts), sum(c.train for c in counts))
