"""Issue 25's energy comparison: what one learned image costs, local rules on 2 processes against BP-SSL
in one process and in the BP pipeline on 2, split into compute, memory and communication
(analysis.energy: Horowitz's 45 nm table and an assumed link energy).

    python -m launch.bench.energy --data-root ../shared/data/cifar10     # resumable
    python -m launch.bench.energy --render                               # table + figure only

Two scales: width 1/8 on CIFAR-10 (JPEG q75, 32 px, the CPU protocol's batch of 32), and full width
on 96 px images, the paper's STL-10 size. Operations and bytes per image do not change with training,
so each cell counts them over a few steps (SCALES); what does change is the sparsity of the blocks'
inputs (the synaptic operations), measured over those first steps only. No STL-10 here: the 96 px
cells run on laminar's procedural `synthetic_96` images, whose sparsity is theirs, not STL-10's.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from analysis.energy import DEFAULT_TABLE, PARTS, RunEnergy, plot_energy, run_energy
from launch.bench.study import Study
from launch.machine import available_cores, code_version, cpu_name, replace_between_markers
from launch.program import run_program
from launch.runner import bench_run

ROOT = Path(__file__).parents[1]  # launch/
CONFIG = ROOT / "configs" / "protocol_cpu.toml"
RESULTS = Study(ROOT / "results" / "energy.json", CONFIG, 0)  # only its results file: cells are not protocol runs
FIGURES = {"width 1/8, 32 px": ROOT / "results" / "energy_small.png",
           "full width, 96 px": ROOT / "results" / "energy_full.png"}
BENCHMARKS = ROOT.parent / "BENCHMARKS.md"
MARKERS = ("<!-- energy:start -->", "<!-- energy:end -->")
# (label, processes, program, overrides, options) of each way of learning; the BP pipeline: 1F1B, 4 micro-batches
WAYS = (("clapp_pp, 2 processes", 2, "launch.train", ["method=clapp_pp"], ()),
        ("clapp_pp_dfb, 2 processes", 2, "launch.train", ["method=clapp_pp_dfb"], ()),
        ("bp_infonce, 1 process", 1, "launch.train", ["method=bp_infonce"], ()),
        ("bp_infonce, BP pipeline on 2", 2, "launch.bp_pipeline", ["method=bp_infonce"],
         ("--schedule", "1f1b", "--microbatches", "4")))
# scale -> overrides of the protocol (its batch of 32 throughout)
SCALES = {"width 1/8, 32 px": ["data.name=cifar10", "train.steps=40"],
          "full width, 96 px": ["data.name=synthetic_96", "model.width=1.0", "train.steps=2"]}


def run_cell(scale: str, way: tuple, root: str, runs: Path) -> dict:
    label, processes, module, overrides, options = way
    out = runs / f"{scale}_{label}".replace(" ", "_").replace(",", "").replace("/", "-")
    sets = [*SCALES[scale], *overrides] + ([f"data.root={root}"] if root and "cifar10" in SCALES[scale][0] else [])
    began = time.monotonic()
    summary = bench_run(processes, 1, CONFIG, sets, out, module=module, options=options)
    energy = run_energy(out, DEFAULT_TABLE)
    return {"scale": scale, "way": label, "processes": processes, "steps": summary.steps,
            "images_per_s": summary.images_per_s, "energy": energy.as_dict(),
            "bytes_sent_per_image": (summary.accounting or {}).get("bytes_sent_per_image"),
            "wall_s": round(time.monotonic() - began, 1), "code_version": code_version(),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()} ({available_cores()} cores)"}


def as_run(cell: dict) -> RunEnergy:
    e = cell["energy"]
    return RunEnergy(cell["way"], e["blocks"], e["communication_uj"], e["missing"])


def render(results: dict) -> str:
    t = DEFAULT_TABLE
    lines = [f"Per learned image, in microjoules ({t['mac_pj']:.1f} pJ a float32 multiply-accumulate, "
             f"{t['memory_pj_per_bit']:.1f} pJ a DRAM bit, {t['link_pj_per_bit']:.0f} pJ a bit between processes); "
             "MMAC: millions of multiply-accumulates (forward, local update or backward); KiB sent: what the "
             "processes send each other per image.", ""]
    for scale in SCALES:
        cells = [results["cells"][k] for k in results["cells"] if k.startswith(f"{scale}/")]
        if not cells:
            continue
        steps = sorted({c["steps"] for c in cells})
        lines += [f"**{scale}** (counted over {', '.join(map(str, steps))} steps)", "",
                  "| learning | MMAC | KiB sent | compute | memory | communication | total | x local |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        local = next((c for c in cells if c["way"].startswith("clapp_pp,")), None)
        local_total = sum(as_run(local).total(p) or 0 for p in PARTS) if local else None
        for cell in cells:
            run = as_run(cell)
            totals = [run.total(p) or 0.0 for p in PARTS]
            macs = sum(b["macs"] for b in run.blocks.values()) / 1e6
            sent = sum((cell["bytes_sent_per_image"] or {}).values()) / 1024
            ratio = f"{sum(totals) / local_total:.2f}" if local_total else "-"
            lines.append(f"| {cell['way']} | {macs:,.1f} | {sent:,.1f} | " + " | ".join(f"{t:,.1f}" for t in totals)
                         + f" | {sum(totals):,.1f} | {ratio} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.energy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="", help="folder of CIFAR-10 (data.root)")
    parser.add_argument("--render", action="store_true", help="only render the table and figure from the results")
    parser.add_argument("--redo", action="store_true", help="run every cell again")
    parser.add_argument("--runs", type=Path, default=Path("runs/energy"), help="where the run folders go")
    args = parser.parse_args(argv)
    if not args.render:
        for scale in SCALES:
            for way in WAYS:
                key = f"{scale}/{way[0]}"
                if args.redo or key not in RESULTS.load()["cells"]:
                    RESULTS.save_cell(key, run_cell(scale, way, args.data_root, args.runs))
    results = RESULTS.load()
    text = render(results)
    print(text)
    for scale in SCALES:
        runs = [as_run(results["cells"][k]) for k in results["cells"] if k.startswith(f"{scale}/")]
        if runs:
            plot_energy(runs, FIGURES[scale], title=f"energy per learned image, {scale}")
    replace_between_markers(BENCHMARKS, *MARKERS, text)
    return 0


if __name__ == "__main__":
    run_program(main)
