"""What the programs say about the machine and the code a figure was measured with."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from sim.recording import code_version

__all__ = ["available_cores", "code_version", "cpu_name", "describe_machine"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe_machine() -> dict:
    """The machine of a benchmark's JSON: CPU, cores, torch and the GPU if any."""
    return {"cpu": cpu_name(), "cores": available_cores(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
