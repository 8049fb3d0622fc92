"""How a run sets up its training log (RUN_DIR/log.zarr): its settings, the store, the held-out
images and what each rank records (`Recording`: its writers and passes)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from layers.block import Block
from layers.encoder import GRID, NUM_BLOCKS, block_channels
from layers.model import grid_kernels
from layers.seeding import STREAM_PROBE, keyed_generator
from sim.data.datasets import ImageSet
from sim.data.views import plain_views
from sim.pipeline.recording import AlignmentPass, HeldoutPass, Recording
from sim.pipeline.transport import Transport
from sim.record.log_format import STORE_NAME
from sim.record.logbook import BlockInfo, LogSettings, RankLog, create_store
from sim.run.config import to_dict
from sim.run.plan import Plan


def log_settings(plan: Plan, heldout_count: int) -> LogSettings:
    c = plan.config.log
    return LogSettings(c.every, plan.schedule.align_every, heldout_count, c.dtype, c.chunk)


def code_version() -> str:
    """The git commit of this code (with '-dirty' if it has uncommitted changes), or 'unknown'."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, timeout=10, cwd=Path(__file__).parent)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def block_infos(plan: Plan) -> list[BlockInfo]:
    width, info = plan.config.model.width, plan.info
    channels = block_channels(width)
    infos = []
    for index in range(NUM_BLOCKS):
        c_in = info.channels if index == 0 else channels[index - 1]
        infos.append(BlockInfo(block=index, rank=plan.placement.rank_of(index),
                               feature_dim=channels[index] * GRID[index] ** 2, grid=GRID[index],
                               channels=channels[index], has_loss=index == NUM_BLOCKS - 1 or not plan.rule.end_to_end,
                               weight_shape=(channels[index], c_in, 3, 3)))
    return infos


def heldout_images(test_set: ImageSet, count: int, seed: int) -> tuple[np.ndarray, ImageSet]:
    """A fixed random draw of `count` test images: their indices and the images."""
    count = min(count, len(test_set))
    index = torch.randperm(len(test_set), generator=keyed_generator(seed, STREAM_PROBE, -2))[:count].sort().values
    return index.numpy(), ImageSet(*test_set.batch(index))


def start_log(plan: Plan, out_dir: Path, test_set: ImageSet, start: int) -> ImageSet:
    """Rank 0, before the other ranks open it: create the store (or keep it when resuming); returns
    the held-out images."""
    wanted = plan.config.log.heldout
    if wanted > len(test_set):
        print(f"note: log.heldout = {wanted} is more than the {len(test_set)} test images: the log holds all "
              f"{len(test_set)}", flush=True)
    index, images = heldout_images(test_set, wanted, plan.config.train.seed)
    path = out_dir / STORE_NAME
    if start == 0 or not (path / "zarr.json").exists():
        attrs = dict(config=to_dict(plan.config), code_version=code_version(), world_size=plan.world_size,
                     placement=[list(g) for g in plan.placement.groups], dataset=plan.info.name,
                     method=plan.rule.name, num_blocks=NUM_BLOCKS, log_every=plan.config.log.every,
                     align_every=plan.schedule.align_every, heldout_split="test", num_classes=plan.info.num_classes)
        create_store(path, attrs, block_infos(plan), images.labels.numpy(), index)
    return images


def rank_recording(plan: Plan, out_dir: Path, rank: int, blocks: list[Block], start: int, transport: Transport,
                   heldout: ImageSet | None, heldout_count: int, device: torch.device) -> Recording:
    """What this rank records: its blocks' rows of the log, the held-out pass, the alignment pass.
    `heldout` (the images) is rank 0's; every rank knows their number."""
    if not plan.schedule.log_every:
        return Recording()
    own = [b.index for b in blocks]
    infos = [i for i in block_infos(plan) if i.block in own]
    log = RankLog(out_dir / STORE_NAME, infos, log_settings(plan, heldout_count), start)
    images = plain_views(heldout.images, plan.info, device) if rank == 0 else None
    kernels = [grid_kernels(plan.info.image_size)[i] for i in own]
    top_rank = plan.stages - 1
    below = (heldout_count, *plan.shapes.activations[rank - 1][1:]) if rank > 0 else None  # (N, C, H, W)
    heldout_pass = HeldoutPass(blocks, kernels, rank, top_rank, transport, below, images)
    aligns = plan.schedule.align_every > 0
    alignment = AlignmentPass(blocks, rank, top_rank, transport, plan.config.train.seed) if aligns else None
    return Recording(log, heldout_pass, alignment)
