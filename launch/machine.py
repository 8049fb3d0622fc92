"""What the programs record with a figure: the machine and the code it was measured with, and the
files a benchmark writes (NAME.json with every number, NAME.md with the readable table)."""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import torch

from sim.run.log_setup import code_version

__all__ = ["available_cores", "code_version", "cpu_name", "describe_machine", "mean_spread", "replace_between_markers",
           "write_figures"]


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


def mean_spread(values: list[float], single: str = "") -> str:
    """'mean ± sd' of `values` over seeds; one value as it is, followed by `single`; none: '-'."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}{single}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def replace_between_markers(page: Path, start: str, end: str, text: str) -> bool:
    """Put `text` between the `start` and `end` markers of `page` (BENCHMARKS.md); False where the
    page or its markers are missing (an installed copy without the repository's BENCHMARKS.md)."""
    if not page.exists():
        return False
    content = page.read_text()
    if start not in content or end not in content.split(start, 1)[1]:
        print(f"{page} has no '{start}' ... '{end}' pair: the table was not written into it")
        return False
    before, rest = content.split(start, 1)
    page.write_text(f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")
    return True
