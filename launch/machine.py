"""What the programs record with a figure: the machine and the code it was measured with, and the
files a benchmark writes (NAME.json with every number, NAME.md with the readable table)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from sim.recording import code_version

__all__ = ["available_cores", "code_version", "cpu_name", "describe_machine", "write_figures"]


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


def write_figures(out: Path, name: str, result: dict, table: str) -> None:
    """OUT/NAME.json and OUT/NAME.md, and the table on the screen."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
