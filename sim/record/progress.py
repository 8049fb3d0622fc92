"""What both engines show and time while they train: the progress bar and the steady-state clock."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from sim.record.summary import TIMING_WINDOW


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """The training bar of rank 0: refreshed often on a terminal, rarely in a log file."""
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 30)


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
