"""A rank's whole job, from a plan to a run folder, whichever engine trains it.

`run_job` is what `launch.train` and `launch.bp_pipeline` call, on every rank alike: it sets the
threads and the device, starts the memory measurement, joins the process group, records why this
rank failed (so that the others can name it), lets rank 0 read the data and the checkpoints and
share what it found (with data-parallel replicas, each replica's first rank reads its own share of
the batches; replica 0 alone writes checkpoints and the log), builds this rank's blocks, trains
them with the plan's engine (the local engine, `sim.pipeline.local_engine`, or the BP pipeline,
`sim.pipeline.bp_engine`), gathers every result and every block's weights on rank 0, which then writes
final.pt, probes the encoder and writes summary.json.

The run folder: config.toml (resolved), checkpoints/ (local engine), log.zarr (when a log is kept),
final.pt ({block: state_dict}) and summary.json (`sim.record.summary`), written last.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from layers.block import Block
from layers.encoder import NUM_BLOCKS, PATCH_GRADIENT_MAX_PIXELS
from sim.data.datasets import ImageSet, load_split
from sim.data.feed import ViewFeed
from sim.data.views import SimCLRViews
from sim.errors import ConfigError
from sim.pipeline.async_engine import AsyncEngine
from sim.pipeline.async_ranks import AsyncRank
from sim.pipeline.bp_engine import BPPipelineEngine, pipeline_group
from sim.pipeline.free_running import ASYNC, measured_dynamics
from sim.pipeline.local_engine import LocalEngine
from sim.pipeline.recording import Recording
from sim.pipeline.replicas import GradientAverager, replica_group
from sim.pipeline.stage import LocalStage, make_stage
from sim.pipeline.transport import (
    Distributed,
    InProcess,
    PeerFailure,
    Transport,
    first_failure,
    receive_weights,
    record_failure,
    send_weights,
)
from sim.pipeline.world import World, connect, connect_alone, disconnect, stop_with_launcher
from sim.record.peak_memory import PeakMemory
from sim.record.summary import RankResult, RunSummary, finished
from sim.run.accounting import run_accounting
from sim.run.checkpoint import (
    FINAL,
    completed_steps,
    discard_after,
    has_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_final,
    set_aside,
    unreadable_file,
)
from sim.run.config import Config, to_dict
from sim.run.evaluation import probe_encoder, probe_sets
from sim.run.freed_memory import give_back_freed_memory, keep_freed_memory, keeps, kept_setting
from sim.run.log_setup import rank_recording, start_log
from sim.run.plan import Plan

SETUP_TIMEOUT_S = 900.0  # rank 0 may load a large dataset, or gather full-width weights, for minutes


@dataclass
class RankData:
    """What a rank reads: rank 0 the feed, the probe's images and the log's; each other replica's
    first rank only its feed; the other ranks no images."""
    feed: ViewFeed | None = None
    probe_sets: tuple[ImageSet, ImageSet] | None = None  # (train, test) images of the final probe
    test_set: ImageSet | None = None  # where the log's held-out images come from


def run_job(plan: Plan, out_dir: Path, *, world: World = World(), resume: bool = False,
            progress: bool = True) -> RunSummary | None:
    """Train this rank's share of the plan; returns the summary on rank 0, None elsewhere.

    `resume` continues from the last complete checkpoint in `out_dir`; so does a job that torchrun
    restarted (world.attempt > 0)."""
    stop_with_launcher(world, out_dir)  # under torchrun: say why if the agent dies or ends this worker
    check_run_folder(out_dir, resume, world.attempt, world.rank)
    if plan.config.train.threads:
        torch.set_num_threads(plan.config.train.threads)
    speedups(plan.config, plan.held_memory(plan.placement.groups[plan.mesh.position(world.rank)[1]]))
    device = world.device(plan.config.train.device)
    memory = PeakMemory(device)  # what the work holds: from here (imports done) to the end of training
    memory.start()
    store, averager = None, None
    replica, stage = plan.mesh.position(world.rank)
    transport: Transport = InProcess(device)
    if world.distributed:
        store = connect(world, device, SETUP_TIMEOUT_S)
        timeout = plan.config.sim.timeout_s
        transport = Distributed(stage, device, store, timeout, max_in_flight=plan.schedule.sends_in_flight(stage),
                                base=plan.mesh.rank(replica, 0))
        if plan.replicas > 1:
            averager = GradientAverager(replica_group(plan.mesh, stage), plan.mesh, replica, stage, transport)
    elif plan.pipeline is not None:
        connect_alone(device)
    try:
        summary = _run_rank(plan, out_dir, world=world, device=device, transport=transport, averager=averager,
                            resume=resume, progress=progress, memory=memory)
    except BaseException as error:
        if store is None:
            disconnect()
            raise
        if not isinstance(error, PeerFailure):
            reason = first_failure(store)  # a rank that failed first has left its reason there
            if reason is not None:
                raise PeerFailure(f"rank {world.rank} stops because {reason}") from error
            record_failure(store, f"rank {world.rank} failed: {type(error).__name__}: {error}")
        raise  # without tearing the process group down: that could wait on a broken peer
    disconnect()
    return summary


def speedups(config: Config, held: dict[str, int] | None = None) -> dict:
    """Turn on, once per process, the speed-ups `config` asks of the process itself (freed memory
    kept: under "auto", where the process's blocks hold `held` and keeping pays); returns every
    speed-up in effect, as summary.json records it."""
    if keeps(config.train.keep_freed_memory, held):
        keep_freed_memory()
    return speedup_record(config, kept_setting())


def speedup_record(config: Config, kept: str | None) -> dict:
    """The speed-ups of a run, as summary.json records them; `kept`: what keeping freed memory set."""
    return {"fused_adamw": config.optim.fused, "freed_memory_kept": kept,
            "patch_product_weight_gradient_max_pixels": PATCH_GRADIENT_MAX_PIXELS, "relu_in_place": True}


def check_run_folder(out_dir: Path, resume: bool, attempt: int, rank: int = 0) -> None:
    """A run folder that would lose or mix data, or cannot be made, is refused before any work
    (on every rank alike, so that no rank waits for one that stopped here)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a folder for the run")
    if finished(out_dir):
        raise ConfigError(f"{out_dir} already holds a finished run; choose another --out or remove it")
    if not resume and not attempt and has_checkpoints(out_dir):
        if not completed_steps(out_dir):  # a run stopped while writing its first: --resume would refuse
            raise ConfigError(f"{out_dir} holds checkpoints of an unfinished run but none complete, so nothing to "
                              f"resume from; remove {out_dir}, or choose another --out")
        raise ConfigError(f"{out_dir} holds checkpoints of an unfinished run: continue it with "
                          f"--resume {out_dir}, or choose another --out")
    if rank > 0:  # rank 0 makes the folder: one rank's test of it is enough
        return
    missing = [p for p in [out_dir, *out_dir.absolute().parents] if not p.exists()]
    try:  # make the folder and its missing parents, then remove them: nothing is left if the run fails early
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {out_dir} cannot be made ({error.strerror or error}); choose another --out") from None
    for folder in missing:
        with contextlib.suppress(OSError):
            folder.rmdir()


def resume_point(out_dir: Path, resume: bool, restarted: bool) -> int:
    """The step a run starts from: its newest checkpoint that reads completely when resuming or
    restarted, else 0. Newer ones that do not read are set aside (checkpoints/unreadable/), said so."""
    if resume or restarted:
        for step in reversed(completed_steps(out_dir)):
            reason = unreadable_file(out_dir, step)
            if reason is None:
                print(f"resuming {out_dir} from its checkpoint after step {step}", flush=True)
                return step
            moved = set_aside(out_dir, step)
            print(f"the checkpoint of step {step} does not read ({reason}): set aside in {moved}; "
                  "trying the one before", flush=True)
    if resume:
        raise ConfigError(f"{out_dir} holds no complete checkpoint that reads to resume from; start the run again "
                          f"from its config, e.g. python -m launch.train {out_dir / 'config.toml'} --out OTHER_FOLDER")
    if restarted:
        print(f"restarted, but {out_dir} holds no complete checkpoint: training again from step 0", flush=True)
    return 0


def training_feed(plan: Plan, device: torch.device, replica: int) -> ViewFeed:
    """The batches that replica `replica`'s first stage trains on (rank 0 alone may download the data)."""
    config = plan.config
    ssl_set = load_split(plan.info.name, config.data.root or None, "ssl", config.data.download and replica == 0)
    return ViewFeed(ssl_set, SimCLRViews(plan.info, device), config.train.batch_size, config.train.seed, replica,
                    plan.replicas)


def read_rank_zero_data(plan: Plan, device: torch.device) -> RankData:
    config, name, root = plan.config, plan.info.name, plan.config.data.root or None
    data = RankData(training_feed(plan, device, replica=0))
    if config.probe.epochs or plan.schedule.log_every:
        data.test_set = load_split(name, root, "test", config.data.download)
    if config.probe.epochs:
        data.probe_sets = probe_sets(config, data.test_set)
    return data


def _run_rank(plan: Plan, out_dir: Path, *, world: World, device: torch.device, transport: Transport,
              averager: GradientAverager | None, resume: bool, progress: bool, memory: PeakMemory) -> RunSummary | None:
    data, heldout = RankData(), None
    start = stop = heldout_count = 0
    replica, stage = plan.mesh.position(world.rank)
    if world.rank == 0:  # only the first rank reads the probe's images and the checkpoints
        data = read_rank_zero_data(plan, device)
        stop = plan.total_steps(data.feed.steps_per_epoch)
        print(plan.describe(stop, device, len(data.feed.images)))
        start = resume_point(out_dir, resume, world.attempt > 0)
        discard_after(out_dir, start if start else -1)  # what came after it will be written again
        print(plan.encoder_table())
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(plan.config_toml)
        if plan.schedule.log_every:
            heldout = start_log(plan, out_dir, data.test_set, start)
            heldout_count = len(heldout)
    transport.barrier("the setup barrier", SETUP_TIMEOUT_S)  # then share what rank 0 found
    start, stop, heldout_count = transport.broadcast([start, stop, heldout_count])
    if stage == 0 and replica > 0:  # another replica's first stage: its share of every batch (rank 0 has the data)
        data = RankData(training_feed(plan, device, replica))
    blocks = plan.build_blocks(plan.placement.groups[stage], device)
    # every replica from the same files: the same weights everywhere
    recent_losses = load_checkpoint(out_dir, start, blocks) if start else {}
    rank = RankSetup(plan=plan, out_dir=out_dir, world=world, replica=replica, stage=stage, device=device,
                     transport=transport, averager=averager, blocks=blocks, data=data, start=start, stop=stop,
                     heldout=heldout, heldout_count=heldout_count, recent_losses=recent_losses)
    engine: Engine = (pipeline_engine(rank) if plan.pipeline is not None else
                      async_engine(rank) if plan.free_running is not None else local_engine(rank))
    transport.barrier("the start barrier", SETUP_TIMEOUT_S)  # every rank built: start the clocks together
    result = engine.run(start, stop, progress=progress and replica == 0, memory=memory)  # one bar: replica 0's
    result.freed_memory_kept = kept_setting()
    give_back_freed_memory()  # training is over: the probe and the summary need none of it
    gathered = _gather(plan, world, device, transport, blocks, result)
    if gathered is None:
        return None
    every_block, results = gathered
    return _finish(plan, out_dir, every_block, results, data.probe_sets, device, progress, stop)


@dataclass(frozen=True, kw_only=True)
class RankSetup:
    """What a rank has when its engine is built: its blocks (restored if resuming) and, on each
    replica's first stage, the data; `heldout` (rank 0's held-out images) and their number (every
    rank's) feed the log, which replica 0 keeps."""
    plan: Plan
    out_dir: Path
    world: World
    replica: int
    stage: int  # this rank's place in its replica's pipeline: the rank its schedule knows
    device: torch.device
    transport: Transport
    averager: GradientAverager | None
    blocks: list[Block]
    data: RankData
    start: int
    stop: int  # the run's last step: where a decaying learning rate ends
    heldout: ImageSet | None
    heldout_count: int
    recent_losses: dict[int, list[float]]  # from the checkpoint resumed: each block's latest losses


class Engine(Protocol):
    """What trains a rank's blocks: the local engine or the BP pipeline engine."""

    def run(self, start: int, stop: int, *, progress: bool = True, memory: PeakMemory | None = None) -> RankResult:
        ...


def local_engine(rank: RankSetup) -> LocalEngine:
    """The local engine of this rank, with its log (replica 0) and checkpoints."""
    plan, blocks, schedule = rank.plan, rank.blocks, rank.plan.schedule
    if rank.replica == 0:  # the first replica keeps the log; the others hold the same weights
        recording = rank_recording(plan, rank.out_dir, rank.stage, blocks, rank.start, rank.transport, rank.heldout,
                                   rank.heldout_count, rank.device)
    else:
        recording, schedule = Recording(), dataclasses.replace(schedule, log_every=0, align_every=0)
    stage = make_stage(blocks, plan.config.train.seed, stash_weights=plan.stashes_weights,
                       feedback_delay=plan.top_stage_delay if rank.stage == plan.stages - 1 else 0,
                       trace=plan.keeps_traces, codecs=plan.codecs,
                       observe=recording.wants, learning_rate=plan.learning_rate(rank.stop), averager=rank.averager,
                       replica=rank.replica)

    def checkpoint(step: int) -> None:
        if rank.replica == 0:  # the weights are the same in every replica: written once
            save_checkpoint(rank.out_dir, step, blocks, engine.recent)
        if rank.averager is not None:  # the other replicas wait here, not in their next average
            rank.averager.barrier(SETUP_TIMEOUT_S)

    engine = LocalEngine(rank.stage, schedule, stage, rank.device, shapes=plan.shapes, feed=rank.data.feed,
                         transport=rank.transport, recording=recording, checkpoint=checkpoint)
    for block, losses in rank.recent_losses.items():  # a resumed run averages what an uninterrupted one does
        engine.recent[block].extend(losses)
    return engine


def async_engine(rank: RankSetup) -> AsyncEngine | AsyncRank:
    """Free-running block groups: simulated in one process, or one group per process (checkpoints at
    consistent cuts)."""
    plan, setup = rank.plan, rank.plan.free_running
    if plan.config.log.every and plan.config.log.align_every and rank.world.rank == 0:
        print("note: a free-running log holds no alignment pairs (log.align_every is ignored)", flush=True)
    recording = rank_recording(plan, rank.out_dir, rank.stage, rank.blocks, rank.start, rank.transport, rank.heldout,
                               rank.heldout_count, rank.device)

    def stage(blocks: list[Block]) -> LocalStage:
        return make_stage(blocks, plan.config.train.seed, stash_weights=plan.stashes_weights, trace=plan.keeps_traces,
                          learning_rate=plan.learning_rate(rank.stop), codecs=plan.codecs)

    def checkpoint(step: int) -> None:
        save_checkpoint(rank.out_dir, step, rank.blocks)

    every = plan.config.train.checkpoint_every
    if plan.stages > 1:
        return AsyncRank(rank.stage, setup, stage(rank.blocks), rank.device, transport=rank.transport,
                         shapes=plan.shapes, feed=rank.data.feed, pace_s=plan.config.sim.pace_s,
                         checkpoint_every=every, checkpoint=checkpoint, recording=recording,
                         log_every=plan.schedule.log_every)
    by_index = {b.index: b for b in rank.blocks}
    return AsyncEngine(setup, [stage([by_index[i] for i in group]) for group in setup.groups], rank.data.feed,
                       rank.device, plan.config.train.batch_size, checkpoint_every=every, checkpoint=checkpoint,
                       recording=recording, log_every=plan.schedule.log_every)


def pipeline_engine(rank: RankSetup) -> BPPipelineEngine:
    """The BP pipeline engine of this rank (one replica; no log, no checkpoints)."""
    plan, world = rank.plan, rank.world
    if world.rank == 0 and plan.config.log.every:
        print("note: the BP pipeline keeps no log.zarr (log.every is ignored)", flush=True)
    group = pipeline_group(plan.config.sim.timeout_s) if world.distributed else None  # every rank, same point
    return BPPipelineEngine(rank.blocks, rank=world.rank, stages=plan.stages, device=rank.device, group=group,
                            settings=plan.pipeline, seed=plan.config.train.seed,
                            shapes=plan.microbatch_shapes(world.rank), learning_rate=plan.learning_rate(rank.stop),
                            feed=rank.data.feed)


def _gather(plan: Plan, world: World, device: torch.device, transport: Transport, blocks: list[Block],
            result: RankResult) -> tuple[list[Block], list[RankResult]] | None:
    """Every block (weights as trained) and every rank's result, on rank 0; None on the others."""
    replica = plan.mesh.position(world.rank)[0]
    with transport.patience(SETUP_TIMEOUT_S):  # gathering full-width weights may take minutes between machines
        results = transport.gather(result)
        if world.rank > 0:
            if replica == 0:  # the first replica's weights: the others' are the same
                send_weights(transport, blocks, 0)
            return None
        own = plan.placement.groups[0]
        rest = plan.build_blocks([i for i in range(NUM_BLOCKS) if i not in own], device)
        for sender in range(1, plan.stages):
            receive_weights(transport, [b for b in rest if b.index in plan.placement.groups[sender]], sender)
    for number, found in enumerate(results):
        found.rank = number  # engines name their stage; the summary names every process
    return blocks + rest, results


def _free_running_record(plan: Plan, results: list[RankResult], stop: int) -> dict | None:
    """summary.json's free_running: the simulation's record, or the ranks' merged with its prediction."""
    if plan.free_running is None:
        return None
    if plan.stages == 1:
        return results[0].free_running
    start = stop - results[0].steps
    return measured_dynamics(plan.free_running, [r.free_running for r in results], start, stop,
                             plan.config.train.batch_size, plan.config.train.checkpoint_every)


def _finish(plan: Plan, out_dir: Path, blocks: list[Block], results: list[RankResult],
            probe_sets: tuple[ImageSet, ImageSet] | None, device: torch.device, progress: bool,
            stop: int) -> RunSummary:
    """Rank 0, with every block's final weights: final.pt, the probe, summary.json."""
    config = plan.config
    save_final(out_dir / FINAL, blocks)
    probe = None
    if probe_sets is not None:
        probe = probe_encoder(blocks, plan.info, *probe_sets, config, device=device, progress=progress)
    pipeline = plan.pipeline
    summary = RunSummary.from_results(
        results, plan.replicas * config.train.batch_size, replicas=plan.replicas, method=plan.rule.name,
        dataset=plan.info.name, engine="bp_pipeline" if pipeline else ASYNC if plan.free_running else "local",
        steps=stop, probe=probe,
        placement=[list(g) for g in plan.placement.groups],
        schedule=pipeline.schedule if pipeline else ASYNC if plan.free_running else plan.schedule.name,
        feedback=None if pipeline or not plan.rule.needs_feedback else ASYNC if plan.free_running else
        plan.schedule.feedback,
        microbatches=None if pipeline is None else pipeline.microbatches,
        device=str(device), threads=torch.get_num_threads(), torch=torch.__version__, config=to_dict(config),
        speedups=speedup_record(config, results[0].freed_memory_kept),
        free_running=_free_running_record(plan, results, stop),
        accounting=run_accounting(plan, results))
    summary.write(out_dir)
    return summary
