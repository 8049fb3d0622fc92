"""RUN_DIR/summary.json: what a finished run reports about itself, the one definition of its format.

Written by rank 0 at the end of a run (`sim.run.job`), whichever engine trained it; read by the
programs that compare runs (launch.compare, launch.bench) and by `analysis report`. Standard library
only, so that `analysis` can read it without importing torch.

Fields (see `RunSummary`): what ran (method, dataset, engine, world_size, replicas, placement (of one
replica), schedule, feedback, microbatches, config), how far (steps), how fast (images_per_s over the whole loop,
images_per_s_steady over timed windows after warm-up, train_seconds, per-rank times and bytes),
how much memory (peak_memory_bytes per rank: what the work holds, imports excluded), what it
learned (loss_per_block, replica 0's with replicas; the probe's accuracies), where (device, threads,
torch) and with which speed-ups in effect (speedups).

Changes from the first format: "engine", "microbatches", "speedups" and "replicas" are new; the BP pipeline's "loss" is
now loss_per_block[5] and its "step_end_seconds" gave way to images_per_s_steady; every rank has
"busy_seconds"; the probe's "test_acc", "per_block_test_acc" and "test_images" are "probe_accuracy",
"per_block_probe_accuracy" and "scored_images", with "scored_on" saying whether they were measured on
test or validation images; every rank has "freed_memory_kept" and, from the local engine,
"phase_seconds" (where its loop's time went). `RunSummary.read` still reads summaries written before these
changes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_NAME = "summary.json"
# sim.pipeline.local_engine, sim.pipeline.bp_engine, and free-running blocks (sim.pipeline.async_engine in one
# process, sim.pipeline.async_ranks on K)
ENGINES = ("local", "bp_pipeline", "async")
LOSS_WINDOW = 50  # reported losses are means over each block's last LOSS_WINDOW updates
TIMING_WINDOW = 20  # steps per timed window of the steady-state throughput


@dataclass
class RankResult:
    """One rank's measurements of its training loop (picklable: gathered on rank 0)."""
    rank: int
    blocks: list[int]
    steps: int  # batches this rank trained in this call (fewer than the run's after a resume)
    seconds: float  # wall time of the loop, pipeline fill and drain included
    busy_seconds: float  # compute; the rest of `seconds` is waiting on other ranks
    wait_seconds: float
    bytes_sent: int
    peak_memory_bytes: int
    loss_per_block: dict[int, float] = field(default_factory=dict)  # mean of the last LOSS_WINDOW losses
    feedback_delays: dict[int, int] = field(default_factory=dict)  # block -> steps from a forward to its update
    window_seconds: list[float] = field(default_factory=list)  # duration of each TIMING_WINDOW steps
    free_running: dict | None = None  # async: sim.pipeline.free_running.dynamics, the ages and the virtual clock
    input_zero_fraction: dict[int, float] = field(default_factory=dict)  # block -> zeros in its input, over the run
    bytes_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # "sent"/"received" -> kind -> bytes
    # where the loop's seconds went (the local engine): compute, views, messages (sending, receiving; their
    # waits on a peer under "wait"), record (log, alignment, checkpoints), other (the rest of the loop)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    freed_memory_kept: str | None = None  # what keeping freed memory set in this rank (sim.run.freed_memory)

    def steady_steps_per_s(self) -> float | None:
        """Median rate over timed windows, the first (warm-up) left out; None for short runs."""
        windows = sorted(self.window_seconds[1:])
        return TIMING_WINDOW / windows[len(windows) // 2] if windows else None


@dataclass
class RunSummary:
    method: str
    dataset: str
    engine: str  # one of ENGINES
    world_size: int
    steps: int  # the run's last step (all of them, resumed or not)
    images_per_s: float  # over the loop of this call, fill and drain included
    images_per_s_steady: float | None  # median over timed windows of the last rank, warm-up left out
    loss_per_block: list[float | None]  # None: a block without a loss of its own
    # sim.run.evaluation.probe_encoder's result: probe_accuracy, per_block_probe_accuracy (percent) and
    # scored_on ("test", or "validation" with probe.validation > 0); None when probe.epochs = 0
    probe: dict | None
    peak_memory_bytes: list[int]  # per rank
    placement: list[list[int]]
    schedule: str  # sequential | pipelined (local engine); gpipe | 1f1b (BP pipeline)
    feedback: str | None  # exact | delayed, for methods with top-down feedback
    feedback_delay_steps: list[int] | None  # per block; None: free-running (its ages are in free_running)
    ranks: list[dict]  # per rank: rank, blocks, seconds, busy_seconds, wait_seconds, bytes_sent
    train_seconds: float  # the slowest rank's loop
    device: str
    threads: int
    torch: str
    config: dict  # the resolved config, as config.toml holds it
    microbatches: int | None = None  # BP pipeline only
    replicas: int = 1  # data-parallel replicas: world_size = replicas x processes per replica
    # what made it fast: fused_adamw (optim.fused), freed_memory_kept (sim.run.freed_memory's setting or None),
    # patch_product_weight_gradient_max_pixels and relu_in_place (layers.encoder, always on)
    speedups: dict = field(default_factory=dict)
    # sim.schedule = "async": the virtual clock against lockstep, and per block the batches learned and the
    # distributions of input and context ages (sim.pipeline.free_running.dynamics); None otherwise
    free_running: dict | None = None
    # per block and image: multiply-accumulates, input zeros, synaptic operations, state held; bytes sent per
    # image by message kind (sim.run.accounting); None in summaries written before it
    accounting: dict | None = None

    @classmethod
    def from_results(cls, results: list[RankResult], batch_size: int, **fields: Any) -> RunSummary:
        """The fields every summary derives from the ranks' results; `fields` gives the rest."""
        seconds = max(r.seconds for r in results)  # the run lasts as long as its slowest rank
        trained = results[0].steps
        losses = {b: v for r in reversed(results) for b, v in r.loss_per_block.items()}  # replica 0's, as logged
        blocks = sorted(b for r in results for b in r.blocks)
        delays = {b: d for r in results for b, d in r.feedback_delays.items()}  # others learn at once: 0
        free = fields.get("free_running") is not None
        # the last rank: the pipeline's output; free-running, the first: the stream of batches (the others skip some)
        rate = results[0 if free else -1].steady_steps_per_s()
        return cls(
            world_size=len(results), train_seconds=seconds,
            images_per_s=trained * batch_size / seconds if trained else 0.0,
            images_per_s_steady=None if rate is None else rate * batch_size,
            loss_per_block=[losses.get(b) for b in blocks],
            feedback_delay_steps=None if free else [delays.get(b, 0) for b in blocks],
            peak_memory_bytes=[r.peak_memory_bytes for r in results],
            ranks=[{"rank": r.rank, "blocks": r.blocks, "seconds": r.seconds, "busy_seconds": r.busy_seconds,
                    "wait_seconds": r.wait_seconds, "bytes_sent": r.bytes_sent,
                    "freed_memory_kept": r.freed_memory_kept,
                    **({"phase_seconds": r.phase_seconds} if r.phase_seconds else {})} for r in results],
            **fields)

    @property
    def throughput(self) -> float:
        """Steady-state images/s where the run was long enough to measure it, else the whole-loop mean."""
        return self.images_per_s_steady or self.images_per_s

    def pipeline_efficiency(self) -> float:
        """The slowest rank's busy time over the wall time: 1.0 runs at the pace of its slowest rank."""
        return max(r["busy_seconds"] for r in self.ranks) / self.train_seconds

    def write(self, run_dir: Path) -> None:
        (run_dir / SUMMARY_NAME).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, run_dir: Path) -> RunSummary:
        """The summary in `run_dir`, including those written by earlier versions of laminar."""
        values = json.loads((run_dir / SUMMARY_NAME).read_text())
        old_loss = values.pop("loss", None)  # the BP pipeline's top-block loss, before loss_per_block
        values.pop("step_end_seconds", None)
        values.setdefault("engine", "bp_pipeline" if "microbatches" in values else "local")
        values.setdefault("loss_per_block", [None] * 5 + [old_loss])
        values.setdefault("images_per_s_steady", None)
        values["probe"] = _probe_of(values.get("probe"))
        values.setdefault("feedback", None)
        values.setdefault("feedback_delay_steps", [0] * len(values["loss_per_block"]))
        for rank in values["ranks"]:
            rank.setdefault("busy_seconds", rank["seconds"] - rank["wait_seconds"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def text(self) -> str:
        """What the run prints when it ends."""
        losses = " ".join("-" if v is None else f"{v:.3f}" for v in self.loss_per_block)
        memory = " ".join(f"{b / 2**20:.0f}" for b in self.peak_memory_bytes)
        mesh = f" ({self.replicas} replicas x {self.world_size // self.replicas})" if self.replicas > 1 else ""
        lines = [f"{self.method} on {self.dataset}: {self.steps} steps on {self.world_size} process(es){mesh}, "
                 f"{self.images_per_s:.1f} images/s, peak memory per process (MiB): {memory}",
                 f"loss per block (mean of the last steps): {losses}"]
        if self.free_running:
            lines.append(free_running_text(self.free_running))
        if self.accounting:
            lines.append(accounting_text(self.accounting))
        if self.probe:
            per_block = " ".join(f"{a:.1f}" for a in self.probe["per_block_probe_accuracy"])
            lines.append(f"linear probe {self.probe['scored_on']} accuracy: {self.probe['probe_accuracy']:.2f}% "
                         f"(per block: {per_block})")
        return "\n".join(lines)


def accounting_text(accounting: dict) -> str:
    """One line: what an image cost, in multiply-accumulates, synaptic operations and bytes sent."""
    blocks = accounting["blocks"].values()
    millions = {name: sum(b[f"{name}_macs"] for b in blocks) / 1e6 for name in ("forward", "update", "backward")}
    text = ("per image: " + ", ".join(f"{v:,.1f} M multiply-accumulates {k}" for k, v in millions.items() if v))
    synaptic = [b["synaptic_ops"] for b in blocks]
    if None not in synaptic:
        text += f"; {sum(synaptic) / 1e6:,.1f} M synaptic operations (forward, non-zero inputs only)"
    sent = sum(accounting["bytes_sent_per_image"].values())
    return text + (f"; {sent / 1024:,.1f} KiB sent between processes" if sent else "")


def free_running_text(dynamics: dict) -> str:
    """Two lines on a free-running run: its virtual time against lockstep, what each block learned from."""
    blocks = dynamics["blocks"]

    def mean(histogram: dict) -> str:
        count = sum(histogram.values())
        return "-" if not count else f"{sum(int(a) * n for a, n in histogram.items()) / count:.1f}"

    learned = " ".join(str(blocks[b]["batches"]) for b in sorted(blocks, key=int))
    inputs = " ".join(mean(blocks[b]["input_age"]) for b in sorted(blocks, key=int))
    contexts = " ".join(mean(blocks[b]["context_age"]) for b in sorted(blocks, key=int))
    how = f"{dynamics['mailbox']} mailbox, depth {dynamics['mailbox_depth']}"
    ages = f"batches learned per block: {learned}; mean input age: {inputs}; mean context age: {contexts}"
    if dynamics.get("engine") == "processes":
        seconds = " ".join(f"{s:.3f}" for s in dynamics["seconds_per_batch"])
        predicted = dynamics["predicted_blocks"]
        guess = " ".join(mean(predicted[b]["context_age"]) for b in sorted(predicted, key=int))
        return (f"free-running on {len(dynamics['groups'])} processes ({how}): seconds per batch per process "
                f"{seconds}\n{ages} (the simulation fed these speeds: {guess})")
    if not dynamics["virtual_time"]:  # no batch in this call (a finished run resumed)
        return f"free-running ({how}): no batch"
    return (f"free-running ({how}): virtual time {dynamics['virtual_time']:.4g} against "
            f"{dynamics['lockstep_virtual_time']:.4g} in lockstep ({dynamics['speedup_over_lockstep']:.2f}x)\n{ages}")


def _probe_of(probe: dict | None) -> dict | None:
    """A summary's probe in today's names: before, `test_acc`, `per_block_test_acc` and `test_images` held
    the accuracy on, and the number of, whichever images `scored_on` names (the test images when absent)."""
    if probe is None:
        return None
    probe = dict(probe)
    for old, new in (("test_acc", "probe_accuracy"), ("per_block_test_acc", "per_block_probe_accuracy"),
                     ("test_images", "scored_images")):
        if old in probe:
            probe.setdefault(new, probe.pop(old))
    probe.setdefault("scored_on", "test")
    return probe


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run (its summary is written last)."""
    return (run_dir / SUMMARY_NAME).exists()
