"""What several test modules share: the tiny run they train, its command line, and how its results
are read and compared. Test modules import from here, never from one another."""
from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from launch.train import main
from layers.block import Block
from layers.encoder import NUM_BLOCKS
from layers.learning_rate import LearningRate
from sim.data.datasets import dataset_info, load_split
from sim.data.feed import ViewFeed
from sim.data.views import SimCLRViews
from sim.pipeline.stage import Averager, EndToEndStage, LocalStage
from sim.run.config import Config, load_config
from sim.run.plan import make_plan

ROOT = Path(__file__).parent.parent
TINY_CONFIG = ROOT / "launch/configs/tiny.toml"
# Small enough for a few seconds per process on two shared cores; random negatives, so that the
# keyed negative generators are part of what must match across world sizes.
TINY = ["data.name=synthetic", "model.width=0.0625", "train.batch_size=4", "train.steps=6", "train.threads=1",
        "rule.negatives=random", "probe.epochs=0", "sim.timeout_s=30", "log.heldout=32"]

Weights = dict[int, dict[str, torch.Tensor]]  # block -> state dict, as in final.pt


def args(*overrides: str, out: Path) -> list[str]:
    """The command line of `launch.train` for the tiny run with `overrides`, writing into `out`."""
    argv = [str(TINY_CONFIG)]
    for override in TINY + list(overrides):
        argv += ["--set", override]
    return argv + ["--out", str(out)]


def run_config(*overrides: str) -> Config:
    """The config `args(*overrides)` gives a run, for tests that rebuild the run in-process."""
    return load_config(TINY_CONFIG, TINY + list(overrides))


def single_process(out: Path, *overrides: str) -> Weights:
    """Train the tiny run in this process; its final weights."""
    assert main(args(*overrides, out=out) + ["--no-progress"]) == 0
    return final_weights(out)


def final_weights(out: Path) -> Weights:
    return torch.load(out / "final.pt", weights_only=True)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def adamw_step_bound(step: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The largest change of a weight, in learning rates, that step `step` (1, 2, ...) of AdamW can make,
    weight decay aside. The step is lr * m / (sqrt(v) + eps), m = sum_i a_i g_i and v = sum_i b_i g_i^2 the
    bias-corrected averages of the gradients so far, so |m| / sqrt(v) <= sqrt(sum_i a_i^2 / b_i) (Cauchy-
    Schwarz), reached by some gradients: 1 at the first step (lr * g / (|g| + eps)), 1.0036 at the third."""
    beta1, beta2 = betas
    first = [(1 - beta1) * beta1 ** (step - i) / (1 - beta1**step) for i in range(1, step + 1)]  # a_i
    second = [(1 - beta2) * beta2 ** (step - i) / (1 - beta2**step) for i in range(1, step + 1)]  # b_i
    return math.sqrt(sum(a * a / b for a, b in zip(first, second)))


def differing_tensors(a: Weights, b: Weights) -> list[str]:
    """'block key' of every tensor that is not bit for bit the same in `a` and `b`."""
    assert sorted(a) == sorted(b) == list(range(6))
    differing = []
    for block in a:
        assert a[block].keys() == b[block].keys()
        differing += [f"block {block} {key}" for key in a[block] if not torch.equal(a[block][key], b[block][key])]
    return differing


def assert_same_weights(a: Weights, b: Weights) -> None:
    differing = differing_tensors(a, b)
    assert not differing, f"{', '.join(differing)} differ"


@contextmanager
def threads_of(config: Config) -> Iterator[None]:
    """Compute in this process as every rank does: sums in convolutions and views may depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.train.threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batches_of(config: Config, replica: int = 0) -> list[torch.Tensor]:
    """The views of every step of a run of `config`, as replica `replica`'s first rank builds them."""
    info, cpu = dataset_info(config.data.name), torch.device("cpu")
    feed = ViewFeed(load_split(info.name, config.data.root or None, "ssl"), SimCLRViews(info, cpu),
                    config.train.batch_size, config.train.seed, replica, config.sim.replicas)
    return [feed.views_at(step) for step in range(config.train.steps)]  # (2B, C, S, S) each


def blocks_of(config: Config) -> list[Block]:
    """All six blocks of a run of `config`, as `launch.train` builds them."""
    return make_plan(config, config.sim.replicas).build_blocks(range(NUM_BLOCKS), torch.device("cpu"))


def trained_with_delays(config: Config, batches: Sequence[torch.Tensor], delays: Sequence[int],
                        learning_rate: LearningRate | None = None, *, blocks: list[Block] | None = None,
                        averager: Averager | None = None, replica: int = 0) -> Weights:
    """The run of `config` in this process, with a chosen feedback delay per block: block b applies
    the update of batch s (with the top block's context of batch s) just before it forwards batch
    s + delays[b] + 1, and every update still pending after the last batch, as a run's final
    checkpoint does. Blocks and seeds are those of `launch.train`; `averager` and `replica`: one
    replica of several (`trained_as_replicas`)."""
    blocks = blocks or blocks_of(config)
    # One stage per block, so that no stage holds the top block and applies feedback at once;
    # stashed weights, as in delayed runs, so an update uses the weights of its own forward.
    stages = [LocalStage([block], config.train.seed, stash_weights=True, learning_rate=learning_rate,
                         averager=averager, replica=replica) for block in blocks]
    feedback: dict[int, torch.Tensor] = {}  # step -> the top block's pooled activity, (2B, D_top)
    for step, x in enumerate(batches):
        for stage, delay in zip(stages, delays):
            for waiting in sorted(s for s in stage.pending if s < step - delay):
                stage.apply_feedback(waiting, feedback[waiting])
            x = stage.forward(x, step)
        feedback[step] = stages[-1].top_context
    for stage in stages:
        for waiting in sorted(stage.pending):
            stage.apply_feedback(waiting, feedback[waiting])
        stage.settle()  # with replicas, the last updates wait for their averages until here
    return {block.index: block.state_dict() for block in blocks}


def trained_end_to_end(config: Config, batches: Sequence[torch.Tensor], *, blocks: list[Block] | None = None,
                       averager: Averager | None = None, replica: int = 0) -> Weights:
    """A BP-SSL run of `config` in this process (one replica of several with `averager`)."""
    blocks = blocks or blocks_of(config)
    stage = EndToEndStage(blocks, config.train.seed, averager=averager, replica=replica)
    for step, x in enumerate(batches):
        stage.forward(x, step)
    return {block.index: block.state_dict() for block in blocks}


class _ThreadAverager:
    """One replica's side of `trained_as_replicas`' averaging: the gradients of every replica summed
    in replica order, then divided by their number, met at a barrier instead of a process group."""

    def __init__(self, replica: int, barrier: threading.Barrier, slots: list[dict[int, list[torch.Tensor]]]):
        self.replica, self.barrier, self.slots = replica, barrier, slots

    def start(self, block: Block) -> None:
        self.slots[self.replica][block.index] = [p.grad for p in block.parameters() if p.grad is not None]

    def finish(self, block: Block) -> None:
        self.barrier.wait()  # every replica's gradient of this block is in
        each = [slot[block.index] for slot in self.slots]
        averages = []
        for parts in zip(*each):
            total = parts[0].clone()
            for part in parts[1:]:
                total += part
            averages.append(total / len(parts))
        self.barrier.wait()  # every replica has read them before any overwrites its own
        for gradient, average in zip(each[self.replica], averages):
            gradient.copy_(average)


def trained_as_replicas(config: Config, train: Callable[..., Weights], **options) -> list[Weights]:
    """Each of `config.sim.replicas` replicas trained by `train` (trained_with_delays' or
    trained_end_to_end's arguments after the batches in `options`) in a thread of this process,
    with its own share of every batch, gradients averaged across the threads: the reference for
    data-parallel runs, without torch.distributed."""
    replicas = config.sim.replicas
    barrier, slots = threading.Barrier(replicas, timeout=120), [{} for _ in range(replicas)]
    # blocks and views before the threads: blocks are initialised from torch's global generator
    prepared = [(blocks_of(config), batches_of(config, r)) for r in range(replicas)]
    trained: list[Weights | BaseException | None] = [None] * replicas

    def work(replica: int) -> None:
        blocks, batches = prepared[replica]
        try:
            trained[replica] = train(config, batches, blocks=blocks, averager=_ThreadAverager(replica, barrier, slots),
                                     replica=replica, **options)
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the test's thread
            barrier.abort()
            trained[replica] = error

    threads = [threading.Thread(target=work, args=(r,)) for r in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for outcome in trained:
        if isinstance(outcome, BaseException):
            raise outcome
    return trained
