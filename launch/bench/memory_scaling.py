"""Where local learning holds less than BP-SSL: the largest process of a layer-parallel run against
single-process BP-SSL at 96 px, as the batch grows (the paper: -38 % peak GPU memory on STL-10).

    python -m launch.bench.memory_scaling [--width 1.0] [--batches 32,64,128] [--out DIR]   # resumable

For each batch: bp_infonce with all six blocks in one process, and every process of clapp_pp with
K = 6 and K = 3 (Plan's placement), with the paper's full B and with a rank-128 B
(rule.predictor_rank = 128: the CLAPP authors' --use_proj_head at its default --low_rank_dim). Each
process is measured alone in a fresh interpreter (launch/bench/step_timer.py --blocks): two training
steps (the first allocates AdamW's state) of its blocks on random input of its input's shape, one
thread, glibc's default allocator, peak resident memory minus the baseline after imports. So no
host has to fit all K processes at once; a real process holds its messages too, which `--check`
measures: the K = 6 run of the first batch under torchrun, rank by rank beside the lone processes.
Beside each peak, what the plan says the process holds (Plan.held_memory): B's weights, gradients and
AdamW moments (16 bytes a parameter), the convolutions' likewise, and the activity kept for the
backward pass. A measurement the machine's free memory cannot hold (predicted from the same process
at the batch before) is skipped and said. Writes memory_scaling.json, .md and .png into DIR.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from launch.bench.speed import run_step_timer
from launch.machine import code_version, describe_machine, write_figures
from launch.program import ProgramErrors, run_program
from launch.runner import bench_run
from sim.run.config import load_config
from sim.run.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]  # launch/
CONFIG = ROOT / "configs" / "tiny.toml"
DATA = "data.name=synthetic_96"
RANK = 128  # the CLAPP authors' default --low_rank_dim
CASES = {  # name: (method, overrides, processes)
    "bp_infonce": ("bp_infonce", [], 1),
    "clapp_pp K=6": ("clapp_pp", [], 6),
    "clapp_pp K=3": ("clapp_pp", [], 3),
    f"clapp_pp rank-{RANK} B K=6": ("clapp_pp", [f"rule.predictor_rank={RANK}"], 6),
    f"clapp_pp rank-{RANK} B K=3": ("clapp_pp", [f"rule.predictor_rank={RANK}"], 3),
}
PAPER = 0.62  # the paper's local / BP peak on STL-10 (-38 %)
MIB = 2**20


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_alone(method: str, width: float, batch: int, overrides: list[str], blocks: list[int]) -> dict:
    """Peak memory and seconds of two steps of `blocks`, alone in a fresh process (step_timer.py)."""
    return run_step_timer(["--method", method, "--width", str(width), "--batch", str(batch), "--warmup", "1",
                           "--steps", "1", "--blocks", ",".join(map(str, blocks)), "--set", DATA,
                           "--set", "train.keep_freed_memory=false", *[a for o in overrides for a in ("--set", o)]],
                          f"measuring {method} blocks {blocks} at batch {batch}")


def held(plan, group: list[int]) -> dict:
    """What the plan says `group` holds, in bytes: B's state, the convolutions' state, activity."""
    state, matrices = plan.held_memory(group), plan.head_matrices()
    predictor = 16 * sum(params for b in group for params, _ in matrices[b])
    return {"b_state": predictor, "conv_state": state["optimizer_state"] - predictor, "activity": state["activity"]}


def predicted_peak(results: dict, key: str, batch: int, holds: dict) -> float:
    """The peak expected of a process: scaled from its peak at the largest smaller batch measured (the
    state stays, the rest grows with the batch), else its state and twice its activity."""
    state = holds["b_state"] + holds["conv_state"]
    smaller = [(b, r) for b, r in results.get(key, {}).items() if int(b) < batch and "peak_bytes" in r]
    if not smaller:
        return state + 2 * holds["activity"]
    b, result = max(smaller, key=lambda item: int(item[0]))
    return state + (result["peak_bytes"] - state) * batch / int(b)


def run_case(name: str, width: float, batch: int, results: dict, save) -> None:
    method, overrides, processes = CASES[name]
    plan = make_plan(load_config(CONFIG, [DATA, f"model.width={width}", f"train.batch_size={batch}",
                                          f"method={method}", *overrides]), processes)
    for group in plan.placement.groups:
        group = list(group)
        key = f"{name}: blocks {group[0]}-{group[-1]}"
        if str(batch) in results.get(key, {}):
            continue
        holds = held(plan, group)
        expected, free = predicted_peak(results, key, batch, holds), available_bytes()
        if expected > 0.85 * free:
            results.setdefault(key, {})[str(batch)] = {
                **holds, "skipped": f"needs about {expected / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
            print(f"batch {batch} {key}: skipped ({expected / 2**30:.1f} GiB expected)", flush=True)
        else:
            measured = measure_alone(method, width, batch, overrides, group)
            results.setdefault(key, {})[str(batch)] = {**holds, "peak_bytes": measured["peak_memory_bytes"],
                                                       "step_seconds": measured["step_seconds"][-1]}
            print(f"batch {batch} {key}: {measured['peak_memory_bytes'] / MIB:,.0f} MiB", flush=True)
        save()


def check_real_run(width: float, batch: int) -> dict:
    """The K = 6 clapp_pp run under torchrun (one thread a rank): each rank's peak, to set beside the
    lone processes (what a rank holds besides: the messages it receives and sends)."""
    overrides = [DATA, f"model.width={width}", f"train.batch_size={batch}", "train.steps=2", "method=clapp_pp",
                 "sim.placement=auto", "sim.timeout_s=3600", "train.keep_freed_memory=false"]
    with tempfile.TemporaryDirectory() as runs:
        summary = bench_run(6, 1, CONFIG, overrides, Path(runs) / "real_k6")
    return {"batch": batch, "peak_bytes": summary.peak_memory_bytes}


def ratios(result: dict) -> dict[str, dict[str, float]]:
    """Per case and batch: its largest process against bp_infonce, where both were measured."""
    found: dict[str, dict[str, float]] = {}
    for batch in result["batches"]:
        peaks = {}
        for name in CASES:
            cells = [by_batch.get(str(batch), {}) for key, by_batch in result["processes"].items()
                     if key.startswith(name + ": ")]
            if cells and all("peak_bytes" in c for c in cells):
                peaks[name] = max(c["peak_bytes"] for c in cells)
        if "bp_infonce" in peaks:
            for name, peak in peaks.items():
                if name != "bp_infonce":
                    found.setdefault(name, {})[str(batch)] = peak / peaks["bp_infonce"]
    return found


def markdown(result: dict) -> str:
    lines = [f"96 px (STL-10's shapes, synthetic), width {result['width']}, CPU ({result['machine']['cpu']}), "
             "glibc's default allocator, each process alone, two steps, one thread. MiB: measured peak | "
             "plan: the heads' state (B; BP-SSL's projection), the convolutions' state, activity kept.", "",
             "| process | " + " | ".join(f"batch {b}" for b in result["batches"]) + " |",
             "|---|" + "---:|" * len(result["batches"])]
    for key, by_batch in result["processes"].items():
        cells = []
        for batch in result["batches"]:
            c = by_batch.get(str(batch))
            if c is None:
                cells.append("")
                continue
            peak = f"{c['peak_bytes'] / MIB:,.0f}" if "peak_bytes" in c else "not run: " + c["skipped"]
            cells.append(f"{peak} \\| {c['b_state'] / MIB:,.0f}, {c['conv_state'] / MIB:,.0f}, "
                         f"{c['activity'] / MIB:,.0f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", f"Largest process / bp_infonce (the paper: {PAPER} on STL-10):", "",
              "| run | " + " | ".join(f"batch {b}" for b in result["batches"]) + " |",
              "|---|" + "---:|" * len(result["batches"])]
    for name, by_batch in ratios(result).items():
        lines.append(f"| {name} | " + " | ".join(f"{by_batch[str(b)]:.2f}" if str(b) in by_batch else "-"
                                                   for b in result["batches"]) + " |")
    if result.get("check"):
        check = result["check"]
        alone = [result["processes"].get(f"clapp_pp K=6: blocks {b}-{b}", {}).get(str(check["batch"]), {})
                 for b in range(6)]
        lines += ["", f"Check, batch {check['batch']}: clapp_pp K = 6 under torchrun, each rank's peak against the "
                  "same blocks alone (MiB): " + "; ".join(
                      f"rank {r}: {real / MIB:,.0f} / {a.get('peak_bytes', 0) / MIB:,.0f}"
                      for r, (real, a) in enumerate(zip(check["peak_bytes"], alone)))]
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_batch in ratios(result).items():
        batches = sorted(int(b) for b in by_batch)
        ax.plot(batches, [by_batch[str(b)] for b in batches], marker="o", label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axhline(PAPER, color="black", linestyle="--", linewidth=0.8, label=f"the paper, STL-10 ({PAPER})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (images; twice as many views)")
    ax.set_ylabel("largest process / BP-SSL (peak memory)")
    ax.set_title(f"96 px, width {result['width']}, CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.memory_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="model.width (default 1.0, the paper's)")
    parser.add_argument("--batches", default="32,64,128", help="images per step, comma-separated")
    parser.add_argument("--check", action="store_true", help="also run K = 6 under torchrun at the first batch")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "memory_scaling")
    args = parser.parse_args(argv)
    with ProgramErrors(0) as errors:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        if not batches or min(batches) < 2:
            raise ValueError(f"--batches {args.batches}: give batch sizes >= 2, e.g. 32,64,128")
        path = args.out / "memory_scaling.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if result and result.get("width") != args.width:
            raise ValueError(f"{path} holds width {result.get('width')}: give that --width, or another --out")
        result.update({"width": args.width, "batches": sorted(set(result.get("batches", [])) | set(batches)),
                       "machine": describe_machine(), "code_version": code_version(),
                       "date": time.strftime("%Y-%m-%d")})
        result.setdefault("processes", {})
        args.out.mkdir(parents=True, exist_ok=True)

        def save() -> None:
            path.write_text(json.dumps(result, indent=1) + "\n")

        for batch in batches:
            for name in CASES:
                run_case(name, args.width, batch, result["processes"], save)
        if args.check and "check" not in result:
            result["check"] = check_real_run(args.width, batches[0])
        write_figures(args.out, "memory_scaling", result, markdown(result))
        figure(result, args.out / "memory_scaling.png")
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
