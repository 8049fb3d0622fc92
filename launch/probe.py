"""Probe a finished run's encoder again, with other probe settings, without training it again.

    python -m launch.probe RUN_DIR [--set probe.epochs=30 --set probe.train_limit=0 ...] [--out FILE]

Reads RUN_DIR/config.toml and RUN_DIR/final.pt, overrides only `probe.*` keys, and prints (and with
`--out`, writes as JSON) the same probe result that summary.json holds. The run folder is not changed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from launch.program import run_program
from layers.encoder import NUM_BLOCKS
from sim.errors import ConfigError
from sim.run.checkpoint import FINAL, load_final
from sim.run.config import load_config
from sim.run.evaluation import probe_encoder, probe_sets
from sim.run.plan import make_plan


def probe_finished_run(run_dir: Path, overrides: list[str], *, progress: bool = True) -> dict:
    """The probe of RUN_DIR's final encoder under its config with `overrides` (probe.* keys only)."""
    not_probe = [text for text in overrides if not text.strip().startswith("probe.")]
    if not_probe:
        raise ConfigError(f"--set {not_probe[0]}: only probe.* keys can change when probing a finished run")
    if not (run_dir / "config.toml").is_file() or not (run_dir / FINAL).is_file():
        raise ConfigError(f"{run_dir} holds no finished run (config.toml and final.pt); give a run's --out folder")
    config = load_config(run_dir / "config.toml", overrides)
    if config.probe.epochs < 1:
        raise ConfigError("probe.epochs = 0 asks for no probe; give probe.epochs >= 1")
    plan = make_plan(config, 1)
    device = torch.device("cpu")
    blocks = plan.build_blocks(range(NUM_BLOCKS), device)
    for block, state in zip(blocks, load_final(run_dir / FINAL).values()):
        block.load_state_dict(state)
    train_set, scored = probe_sets(config)
    result = probe_encoder(blocks, plan.info, train_set, scored, config, device=device, progress=progress)
    result["probe"] = vars(config.probe)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.probe", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's folder (its --out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="probe.KEY=VALUE",
                        help="override a probe setting, value read as TOML (repeatable)")
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    result = probe_finished_run(args.run_dir, args.overrides, progress=not args.no_progress)
    blocks = " ".join(f"{a:.2f}" for a in result["per_block_probe_accuracy"])
    print(f"{args.run_dir}: probe on {result['scored_on']} images, all blocks {result['probe_accuracy']:.2f} %, "
          f"per block {blocks}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_program(main)
