"""Train one method and probe it: `python -m launch.train CONFIG [--set key=value ...] [--out DIR]`.

Writes into the run folder: config.toml (resolved), checkpoints/, final.pt and summary.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from launch.config import Config, ConfigError, load_config, to_dict, to_toml
from layers.block import RuleSettings
from layers.encoder import describe_encoder
from layers.methods import get_method
from layers.model import build_blocks
from sim.checkpoint import save_checkpoint, save_final
from sim.datasets import DatasetMissing, dataset_info, load_split
from sim.feed import ViewFeed
from sim.probing import linear_probe
from sim.stage import NonFiniteLoss, make_stage
from sim.trainer import train
from sim.views import SimCLRViews


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def default_out_dir(config: Config) -> Path:
    return Path("runs") / f"{config.method}_{config.data.name}_{time.strftime('%Y%m%d-%H%M%S')}"


def total_steps(config: Config, steps_per_epoch: int) -> int:
    if config.train.steps > 0:
        return config.train.steps
    return round(config.train.epochs * steps_per_epoch)  # epochs = 0: a random, untrained encoder


def encoder_table(config: Config, blocks: list) -> str:
    info = dataset_info(config.data.name)
    lines = ["block  output (C,H,W)    conv params   MMAC/img  pool  B / head shapes"]
    for report, block in zip(describe_encoder(config.model.width, info.channels, info.image_size), blocks):
        heads = ", ".join(f"{name} {tuple(h.weight.shape)}" for name, h in block.heads.items()) or "-"
        lines.append(f"{report.index:>5}  {str(report.output_shape):<16} {report.conv_params:>11,}  "
                     f"{report.macs_per_image / 1e6:>8.1f}  {block.pool_kernel:>4}  {heads}")
    return "\n".join(lines)


def run(config: Config, out_dir: Path, progress: bool = True) -> dict:
    """Train `config` in one process, probe the encoder, write the run folder; returns the summary."""
    if (out_dir / "summary.json").exists():
        raise ConfigError(f"{out_dir} already holds a finished run; choose another --out or remove it")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    info = dataset_info(config.data.name)
    root = config.data.root or None
    ssl_set = load_split(config.data.name, root, "ssl", config.data.download)
    if config.probe.epochs:  # load the labeled splits now: a missing one fails before training
        probe_train = load_split(config.data.name, root, "train", config.data.download)
        probe_test = load_split(config.data.name, root, "test", config.data.download)
    method = get_method(config.method)
    rule = RuleSettings(config.rule.contrast, config.rule.negatives, config.rule.proj_dim, config.rule.temperature)
    blocks = build_blocks(method, config.model.width, info.channels, info.image_size, rule, config.train.seed,
                          config.optim.lr, config.optim.weight_decay, config.rule.pool or None, device=device)
    feed = ViewFeed(ssl_set, SimCLRViews(info, device), config.train.batch_size, config.train.seed)
    steps = total_steps(config, feed.steps_per_epoch)
    print(f"{method.name} on {info.name} ({len(ssl_set):,} images), width {config.model.width}, "
          f"batch {config.train.batch_size}, {steps:,} steps, device {device}, {torch.get_num_threads()} threads")
    print(encoder_table(config, blocks))

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(to_toml(config))
    result = train(make_stage(blocks, config.train.seed), feed, steps, device,
                   checkpoint=lambda step: save_checkpoint(out_dir / "checkpoints" / "rank0.pt", step, blocks),
                   checkpoint_every=config.train.checkpoint_every, progress=progress)
    save_final(out_dir / "final.pt", blocks)

    probe = None
    if config.probe.epochs:
        probe = linear_probe(
            blocks, info, take_first(probe_train, config.probe.train_limit), take_first(probe_test, config.probe.test_limit),
            config.probe.epochs, config.probe.batch_size, config.probe.lr, config.probe.augment, config.probe.standardize,
            config.train.seed, device, progress)
    summary = {
        "method": method.name, "dataset": info.name, "world_size": 1, "steps": steps,
        "images_per_s": result.images_per_s, "train_seconds": result.seconds,
        "loss_per_block": result.loss_per_block, "probe": probe,
        "peak_memory_bytes": [result.peak_memory_bytes], "device": str(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "config": to_dict(config),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def take_first(images, limit: int):
    """The first `limit` images of a split (0 = all)."""
    from sim.probing import _subset

    return _subset(images, limit)


def format_summary(summary: dict) -> str:
    losses = " ".join("-" if v is None else f"{v:.3f}" for v in summary["loss_per_block"])
    lines = [f"{summary['method']} on {summary['dataset']}: {summary['steps']} steps, "
             f"{summary['images_per_s']:.1f} images/s, peak memory {summary['peak_memory_bytes'][0] / 2**20:.0f} MiB",
             f"loss per block (mean of the last steps): {losses}"]
    if summary["probe"]:
        per_block = " ".join(f"{a:.1f}" for a in summary["probe"]["per_block_test_acc"])
        lines.append(f"linear probe test accuracy: {summary['probe']['test_acc']:.2f}% (per block: {per_block})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="TOML config, e.g. launch/configs/tiny.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value read as TOML (repeatable)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/METHOD_DATASET_TIME)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        summary = run(config, args.out or default_out_dir(config), progress=not args.no_progress)
    except (ConfigError, DatasetMissing, NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
