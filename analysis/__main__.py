"""python -m analysis COMMAND RUN_DIR: offline analysis of a run's log (RUN_DIR/log.zarr).

    python -m analysis alignment RUN_DIR            cosine(local, BP gradient) per block over training
    python -m analysis probe RUN_DIR [--points N]   linear probe accuracy per block over training
    python -m analysis cka RUN_DIR [OTHER_RUN_DIR] [--step N]
                                                    CKA between blocks; with two runs, block k vs block k
    python -m analysis report RUN_DIR               one HTML page with every figure, table and the config
    python -m analysis curves RUN_DIR [RUN_DIR ...] [--out DIR]
                                                    several runs' probe accuracy against images seen and seconds
    python -m analysis energy RUN_DIR [RUN_DIR ...] [--table TOML] [--out DIR]
                                                    energy per learned image: compute, memory, communication
                                                    (from summary.json: runs without a log too)

Each command prints a table and writes its files into RUN_DIR/analysis/ (or --out DIR).

A damaged log (corrupted chunk files, a lost zarr.json) is analysed without what cannot be read: each
unreadable part is one `warning:` line on stderr naming the array and the steps lost, the outputs are
written from the rest, and the exit status is 0. It is 2, with one line saying what is missing, when
nothing the command needs can be read (or the store's root metadata is damaged).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from analysis import energy, plots
from analysis.cka import blocks_cka, blocks_cka_table, runs_cka, runs_cka_table
from analysis.gradient_alignment import alignment_csv, alignment_table, block_alignment
from analysis.logged_probe import ALPHA, SEED, TRAIN_FRACTION, probe_csv, probe_logged_run, probe_table
from analysis.probe_curves import curves_table, probe_curve, same_images
from analysis.report import build_report
from analysis.store import LogError, RunLog, Unreadable, open_run
from sim.record.log_format import STORE_NAME


def _write(out: Path, name: str, text: str) -> Path:
    path = out / name
    path.write_text(text)
    return path


def _finite(data: object) -> object:
    """`data` with NaN and inf floats as None: they are not JSON, and strict JSON readers reject them."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def _json(data: object) -> str:
    return json.dumps(_finite(data), indent=1, allow_nan=False) + "\n"


def cmd_alignment(run: RunLog, out: Path, args: argparse.Namespace) -> list[Path]:
    result = block_alignment(run)
    print(alignment_table(result))
    return [_write(out, "alignment.csv", alignment_csv(result)),
            _write(out, "alignment.json", _json([r.as_dict() for r in result])),
            plots.plot_alignment(result, out / "alignment.png", title=run.name)]


def cmd_probe(run: RunLog, out: Path, args: argparse.Namespace) -> list[Path]:
    result = probe_logged_run(run, points=args.points, alpha=args.alpha, train_fraction=args.train_fraction,
                              seed=args.seed)
    print(probe_table(result))
    return [_write(out, "probe.csv", probe_csv(result)), _write(out, "probe.json", _json(result.as_dict())),
            plots.plot_probe(result, out / "probe.png", title=f"linear probe per block: {run.name}")]


def cmd_cka(run: RunLog, out: Path, args: argparse.Namespace) -> list[Path]:
    if args.other_run_dir is None:
        result = blocks_cka(run, args.step)
        print(blocks_cka_table(result))
        return [_write(out, "cka_blocks.json", _json(result.as_dict())),
                plots.plot_blocks_cka(result, out / "cka_blocks.png",
                                      title=f"linear CKA, step {result.step}: {run.name}")]
    result = runs_cka(run, args.other_run, args.step)
    print(runs_cka_table(result))
    stem = f"cka_vs_{Path(args.other_run_dir).resolve().name}"
    return [_write(out, f"{stem}.json", _json(result.as_dict())), plots.plot_runs_cka(result, out / f"{stem}.png")]


def cmd_report(run: RunLog, out: Path, args: argparse.Namespace) -> list[Path]:
    written = build_report(run, out, points=args.points)
    print(f"report of {run.name}: open {written[0]} in a browser (self-contained: the figures are embedded)")
    return written


def cmd_curves(run: RunLog, out: Path, args: argparse.Namespace) -> list[Path]:
    runs = [run, *args.more_runs]
    curves = [probe_curve(r, alpha=args.alpha) for r in runs]
    print(curves_table(curves))
    same = same_images(runs)
    if not same:  # each curve is still a fair held-out estimate; their levels compare less exactly
        print("warning: the runs logged different held-out images (another train.seed or log.heldout): each curve "
              "is scored on its own images, and no common untrained line is drawn", file=sys.stderr)
    return [_write(out, "curves.json", _json([c.as_dict() for c in curves])),
            plots.plot_probe_curves(curves, out / "curves.png", title=args.title, untrained_line=same)]


COMMANDS = {"alignment": cmd_alignment, "probe": cmd_probe, "cka": cmd_cka, "report": cmd_report,
            "curves": cmd_curves}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder holding log.zarr")
        c.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/analysis)")
        return c

    command("alignment", "cosine between each block's local gradient and the BP gradient, over training")
    c = command("probe", "linear probe accuracy per block over training (ridge on held-out activations)")
    c.add_argument("--points", type=int, default=0, help="logged steps probed per block, spread evenly (0 = all)")
    c.add_argument("--alpha", type=float, default=ALPHA, help="ridge penalty as a fraction of the fitted images")
    c.add_argument("--train-fraction", type=float, default=TRAIN_FRACTION, help="held-out images used to fit")
    c.add_argument("--seed", type=int, default=SEED, help="seed of the stratified fit/score split")
    c = command("cka", "linear CKA between the blocks of one run, or between the same block of two runs")
    c.add_argument("other_run_dir", type=Path, nargs="?", metavar="OTHER_RUN_DIR",
                   help="a second run with the same held-out images: compare block k with block k")
    c.add_argument("--step", type=int, default=None, help="logged step to compare (default: the last)")
    c = command("report", "one self-contained HTML page with every figure, table and the config")
    c.add_argument("--points", type=int, default=20, help="logged steps probed per block (0 = all)")
    c = command("curves", "probe accuracy of several runs (all blocks, last block) against images seen and seconds")
    c.add_argument("more_run_dirs", type=Path, nargs="*", metavar="RUN_DIR", help="more runs to draw beside it")
    c.add_argument("--alpha", type=float, default=ALPHA, help="ridge penalty as a fraction of the fitted images")
    c.add_argument("--title", default="", help="the figure's title")
    c = sub.add_parser("energy", help="energy per learned image, per block: compute, memory, communication",
                       description=energy.__doc__.splitlines()[0])
    c.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="finished run folders (summary.json)")
    c.add_argument("--table", type=Path, default=None, help="a TOML file of picojoules replacing the default table")
    c.add_argument("--out", type=Path, default=None, help="output folder (default: the first RUN_DIR/analysis)")
    return p


def cmd_energy(args: argparse.Namespace) -> int:
    """The one command that reads summary.json only: it works on runs without a log."""
    try:
        table = energy.load_table(args.table)
        runs = [energy.run_energy(d, table) for d in args.run_dirs]
    except LogError as err:
        print(f"python -m analysis energy: {err}", file=sys.stderr)
        return 2
    print(energy.energy_table(runs, table))
    out = args.out if args.out is not None else args.run_dirs[0] / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    written = [_write(out, "energy.json", _json({"table": table, "runs": [r.as_dict() for r in runs]})),
               energy.plot_energy(runs, out / "energy.png")]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _damage_note(runs: list[RunLog]) -> str:
    """The damaged parts read, for an error that left nothing to analyse: kept on the error's one line."""
    parts = list(dict.fromkeys(f"{d.path}: {d.what} ({d.reason})" for run in runs for d in run.damage))
    if not parts:
        return ""
    shown = "; ".join(parts[:3])
    return f" [unreadable: {shown}{f'; and {len(parts) - 3} more' if len(parts) > 3 else ''}]"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "energy":
        return cmd_energy(args)
    runs: list[RunLog] = []
    try:
        runs.append(open_run(args.run_dir))
        if getattr(args, "other_run_dir", None) is not None:  # cka with a second run
            runs.append(open_run(args.other_run_dir))
        args.other_run = runs[1] if len(runs) > 1 else None
        args.more_runs = [open_run(d) for d in getattr(args, "more_run_dirs", [])]
        runs += args.more_runs
        out = args.out if args.out is not None else args.run_dir / "analysis"
        out.mkdir(parents=True, exist_ok=True)
        written = COMMANDS[args.command](runs[0], out, args)
    except LogError as err:
        note = "" if isinstance(err, Unreadable) else _damage_note(runs)  # Unreadable names its array itself
        print(f"python -m analysis {args.command}: {err}{note}", file=sys.stderr)
        return 2
    for run in runs:  # after the command: arrays are read, and their damage found, as the analysis needs them
        store = STORE_NAME if run is runs[0] else str(run.run_dir / STORE_NAME)
        for line in run.warnings(store):
            print(line, file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
