"""What a run prints and writes about itself: the encoder table and summary.json."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from launch.config import Config, to_dict
from launch.plan import Plan
from layers.encoder import NUM_BLOCKS, describe_encoder
from layers.model import feature_dims
from sim.runtime import RankResult


def encoder_table(plan: Plan) -> str:
    """Each block's output shape, parameters, cost, pooling and loss, as a table."""
    info, method, kernels, width = plan.info, plan.method, plan.kernels, plan.config.model.width
    dims = feature_dims(width, info.image_size, kernels)
    lines = ["block  output (C,H,W)    conv params   MMAC/img  pool  loss on D features from contexts"]
    for report, kernel, dim in zip(describe_encoder(width, info.channels, info.image_size), kernels, dims):
        has_loss = report.index == NUM_BLOCKS - 1 or not method.end_to_end
        loss = f"D = {dim:,} ({', '.join(method.contexts)})" if has_loss else "- (gradient from the top)"
        lines.append(f"{report.index:>5}  {str(report.output_shape):<16} {report.conv_params:>11,}  "
                     f"{report.macs_per_image / 1e6:>8.1f}  {kernel:>4}  {loss}")
    return "\n".join(lines)


def summary_dict(config: Config, plan: Plan, results: Sequence[RankResult], probe: dict | None, steps: int,
                 device: torch.device) -> dict:
    """summary.json: the fields every run has, whatever its number of processes."""
    seconds = max(r.seconds for r in results)  # the run lasts as long as its slowest rank
    losses = {b: v for r in results for b, v in r.loss_per_block.items()}
    trained = results[0].steps  # batches trained in this call (fewer than `steps` after a resume)
    delays = {b: r.feedback_delay for r in results for b in r.blocks}
    return {
        "method": plan.method.name,
        "dataset": plan.info.name,
        "world_size": len(results),
        "steps": steps,
        "images_per_s": trained * config.train.batch_size / seconds if trained else 0.0,
        "images_per_s_steady": _steady(results[-1], config.train.batch_size),
        "loss_per_block": [losses.get(b) for b in range(NUM_BLOCKS)],
        "probe": probe,
        "peak_memory_bytes": [r.peak_memory_bytes for r in results],
        "placement": [list(g) for g in plan.placement.groups],
        "schedule": plan.schedule.name,
        "feedback": plan.schedule.feedback if plan.method.uses_top_context else None,
        "feedback_delay_steps": [delays[b] for b in range(NUM_BLOCKS)],
        "ranks": [{"rank": r.rank, "blocks": r.blocks, "seconds": r.seconds, "wait_seconds": r.wait_seconds,
                   "bytes_sent": r.bytes_sent} for r in results],
        "train_seconds": seconds,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": to_dict(config),
    }


def _steady(result: RankResult, batch_size: int) -> float | None:
    """Median images/s over timed windows of the last rank (the pipeline's output), warm-up left out."""
    rate = result.steady_steps_per_s()
    return None if rate is None else rate * batch_size


def format_summary(summary: dict) -> str:
    losses = " ".join("-" if v is None else f"{v:.3f}" for v in summary["loss_per_block"])
    memory = " ".join(f"{b / 2**20:.0f}" for b in summary["peak_memory_bytes"])
    lines = [f"{summary['method']} on {summary['dataset']}: {summary['steps']} steps on {summary['world_size']} "
             f"process(es), {summary['images_per_s']:.1f} images/s, peak memory per process (MiB): {memory}",
             f"loss per block (mean of the last steps): {losses}"]
    if summary["probe"]:
        per_block = " ".join(f"{a:.1f}" for a in summary["probe"]["per_block_test_acc"])
        lines.append(f"linear probe test accuracy: {summary['probe']['test_acc']:.2f}% (per block: {per_block})")
    return "\n".join(lines)
