"""Peak memory of a benchmark region."""
from __future__ import annotations

from pathlib import Path

import torch


class MemoryMeter:
    """Peak memory of a region: CUDA max_memory_allocated, else the peak-RSS increase (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak_delta"
        self.base = 0

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = -1
            return
        self.base = self._status("VmRSS") or -1

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = self._status("VmHWM")
        if self.base < 0 or hwm is None:
            return None
        return max(0, hwm - self.base) / 2**20
