"""Peak memory held by the work itself, not by the interpreter and its imports (lazy ones included).

On CPU: the peak resident set size during the work minus the resident size when it started (the
kernel's high-water mark is reset at the start through /proc/self/clear_refs). On a GPU:
torch.cuda.max_memory_allocated over the work.
"""
from __future__ import annotations

import resource
from pathlib import Path

import torch


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Call `start()` when the measured work begins and `peak_bytes()` when it ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        # torch.optim imports torch._dynamo (and sympy with it) when the first optimiser is built:
        # about 150 MB of modules, not work. Import it before the baseline, as every process that
        # imports torch.distributed.pipelining (the BP pipeline) already has.
        import torch._dynamo

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # then the peak is the process's lifetime peak: still an upper bound
        self.baseline = (_status_kib("VmRSS") or 0) * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        peak_kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak_kib * 1024 - self.baseline)
