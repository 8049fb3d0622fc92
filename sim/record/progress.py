"""What long work shows and times while it runs: the progress bars of training, the probe and the theory
figures, the engines' steady-state clock and where a rank's time goes."""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

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


class PhaseClock:
    """Seconds a rank's loop spends in each phase (RankResult.phase_seconds): the time a phase spent
    waiting on a peer (what `waited()` counts: the transport's wait_seconds) goes to "wait" instead. On a
    GPU, kernels run asynchronously: a phase holds the time to launch its work, and the waits for earlier
    work land where the host next synchronises (a loss's `.item()` in "record")."""

    def __init__(self, waited: Callable[[], float]):
        self.waited = waited
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began, waited = time.perf_counter(), self.waited()
        try:
            yield
        finally:
            wait = self.waited() - waited
            self.add(name, time.perf_counter() - began - wait)
            self.add("wait", wait)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
