"""Where a training step's time goes: the kernels (CUDA) or operators (CPU) with the most self time, from
``torch.profiler`` over a few steps (``scripts/bench.py --profile N``)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def top_kernels(step: Callable[[dict], object], batches: list[dict], device: torch.device, top: int,
                steps: int = 2) -> list[dict]:
    """The `top` entries by self time over `steps` calls of `step`: on CUDA the device kernels (the CPU operators
    that launch them are left out, so no time is counted twice), on CPU the operators. Each: name, self ms per
    step, share of all self time of its kind, calls per step."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize(device)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]

    def self_us(event) -> float:
        return float(event.self_device_time_total if cuda else event.self_cpu_time_total)

    total = sum(self_us(e) for e in events)
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return [{"name": e.key, "self_ms_per_step": self_us(e) / 1e3 / steps,
             "share": self_us(e) / total if total else 0.0, "calls_per_step": e.count / steps} for e in ranked]
