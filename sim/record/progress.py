"""What long work shows and times while it runs: the progress bars of training, the probe and the theory
figures, and the engines' steady-state clock."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from sim.record.summary import TIMING_WINDOW


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train", unit: str = "step",
                 leave: bool = True) -> tqdm:
    """A bar on stderr: refreshed often on a terminal, every 30 s in a log file or a pipe (where every
    refresh is a line: a probe's hundreds of batches a second would flood the log of launch.compare)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled,
                leave=leave, mininterval=0.5 if sys.stderr.isatty() else 30)


class WindowClock:
    """Durations of consecutive windows of TIMING_WINDOW steps (RankResult.window_seconds)."""

    def __init__(self) -> None:
        self.windows: list[float] = []
        self.count = 0
        self.began = time.perf_counter()

    def tick(self) -> None:
        """One step is done."""
        self.count += 1
        if self.count % TIMING_WINDOW == 0:
            now = time.perf_counter()
            self.windows.append(now - self.began)
            self.began = now
