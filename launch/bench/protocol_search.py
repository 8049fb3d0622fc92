"""The search for a CPU-scale protocol at which learning shows, chosen on a validation split.

    python -m launch.bench.protocol_search --data-root ../shared/data/cifar10   # runs what is left, resumable
    python -m launch.bench.protocol_search --data-root ../shared/data/cifar10 --jobs 2   # two trials at once
    python -m launch.bench.protocol_search --render                           # only the table

Every trial trains on CIFAR-10 (JPEG q75) with launch/configs/table_cpu.toml (width 1/8, batch 32,
one thread, seed 0) and probes on VALIDATION labeled training images held out of the probe's training
images (`probe.validation`): the test split is never read. The selection rule, fixed before the first
trial (BENCHMARKS.md, "The CPU-scale protocol"):

- gain(method) = its validation accuracy (probe of all blocks) minus the untrained encoder's, same probe.
- Stage A, learning rate and schedule, 3,000 steps: clapp_pp and bp_infonce at the constant 2e-4
  (the paper's) and at 200 warm-up steps then a cosine decay to 0 from 1e-3, 2e-3 and 4e-3. The
  setting with the largest min(gain clapp_pp, gain bp_infonce) wins; if it is the grid's largest
  (smallest) cosine rate, 8e-3 (5e-4) is tried too, once.
- Stage B, length: the winner at 9,000 steps; 9,000 is kept if it raises the min gain by at least
  1 point, else 3,000 (the cheaper).
- Stage C, the probe: the chosen runs and the untrained encoder probed again (launch.probe) on all
  45,000 probe images instead of 10,000, for 10 and for 30 epochs: the probe with the highest mean
  validation accuracy of the two trained encoders wins (a probe is judged by what it reads out).
One search for all methods: the other methods of the table take the protocol without a search of their own.
Each finished trial is saved at once in launch/results/protocol_search.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from launch.machine import available_cores, code_version, cpu_name, replace_between_markers
from launch.probe import probe_finished_run
from launch.program import run_program
from launch.runner import launch_run, positive

ROOT = Path(__file__).parents[1]  # launch/
CONFIG = ROOT / "configs" / "table_cpu.toml"
RESULTS = ROOT / "results" / "protocol_search.json"
BENCHMARKS = ROOT.parent / "BENCHMARKS.md"
START, END = "<!-- search:start -->", "<!-- search:end -->"
VALIDATION = 5000
METHODS = ("clapp_pp", "bp_infonce")
SHORT, LONG = 3000, 9000
WARMUP = 200
CONSTANT = "constant 2e-4"
GRID = [1e-3, 2e-3, 4e-3]
EDGES = {4e-3: 8e-3, 1e-3: 5e-4}  # a winner at the grid's edge: the rate tried beyond it
PROBES = {"10k images, 10 epochs": ["probe.train_limit=10000", "probe.epochs=10"],
          "45k images, 10 epochs": ["probe.train_limit=0", "probe.epochs=10"],
          "45k images, 30 epochs": ["probe.train_limit=0", "probe.epochs=30"]}
FIRST_PROBE = "10k images, 10 epochs"


def schedule_overrides(setting: str) -> list[str]:
    """'constant 2e-4' or 'cosine 0.002' -> the optim.* overrides."""
    kind, rate = setting.split()
    if kind == "constant":
        return [f"optim.lr={rate}"]
    return ["optim.schedule=cosine", f"optim.warmup_steps={WARMUP}", f"optim.lr={rate}"]


def cosine(rate: float) -> str:
    return f"cosine {rate:g}"


def trial_key(method: str, setting: str, steps: int) -> str:
    return f"{method}, {setting}, {steps} steps"


def gain(trials: dict, setting: str, steps: int, probe: str = FIRST_PROBE) -> float | None:
    """min over METHODS of (validation accuracy - untrained's), or None until all are measured."""
    untrained = trials.get(trial_key("untrained", "-", 0), {}).get("probes", {}).get(probe)
    found = [trials.get(trial_key(m, setting, steps), {}).get("probes", {}).get(probe) for m in METHODS]
    if untrained is None or None in found:
        return None
    return min(f["test_acc"] - untrained["test_acc"] for f in found)


def stage_a_settings(trials: dict) -> list[str]:
    """Stage A's settings, the edge extension included once the grid is measured."""
    settings = [CONSTANT, *map(cosine, GRID)]
    gains = {s: gain(trials, s, SHORT) for s in settings}
    if None in gains.values():
        return settings
    best = max(gains, key=gains.get)
    for edge, beyond in EDGES.items():
        if best == cosine(edge):
            settings.append(cosine(beyond))
    return settings


def choose(trials: dict) -> dict:
    """What the rule has chosen so far, and the trials still to run (in order)."""
    untrained = trial_key("untrained", "-", 0)
    todo = [] if untrained in trials else [("untrained", "-", 0)]
    settings = stage_a_settings(trials)
    todo += [(m, s, SHORT) for s in settings for m in METHODS if trial_key(m, s, SHORT) not in trials]
    gains = {s: gain(trials, s, SHORT) for s in settings}
    if todo:
        return {"todo": todo}
    setting = max(gains, key=gains.get)
    todo = [(m, setting, LONG) for m in METHODS if trial_key(m, setting, LONG) not in trials]
    if todo:
        return {"setting": setting, "todo": todo}
    steps = LONG if gain(trials, setting, LONG) >= gains[setting] + 1 else SHORT
    chosen = [trial_key(m, setting, steps) for m in METHODS]
    todo_probes = [(key, probe) for key in [untrained, *chosen] for probe in PROBES
                   if probe not in trials[key]["probes"]]
    if todo_probes:
        return {"setting": setting, "steps": steps, "todo": [], "probes": todo_probes}
    means = {p: sum(trials[k]["probes"][p]["test_acc"] for k in chosen) / len(chosen) for p in PROBES}
    return {"setting": setting, "steps": steps, "probe": max(means, key=means.get), "todo": [], "probes": []}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"validation": VALIDATION, "trials": {}}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    temporary = RESULTS.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    temporary.replace(RESULTS)


def base_overrides(root: str) -> list[str]:
    return ["data.name=cifar10", f"data.root={root}", f"probe.validation={VALIDATION}", *PROBES[FIRST_PROBE]]



def _cell(probe: dict) -> dict:
    """A probe's result as protocol_search.json keeps it. Its keys predate `probe_accuracy` and stay, so
    that the trials already measured still read: `test_acc` there is the accuracy on the validation
    images every trial is scored on (BENCHMARKS.md, the protocol)."""
    return {"test_acc": probe["probe_accuracy"], "per_block_test_acc": probe["per_block_probe_accuracy"],
            "train_images": probe["train_images"], "test_images": probe["scored_images"]}

def run_trial(method: str, setting: str, steps: int, root: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    sets = [*base_overrides(root), f"train.steps={steps}"]
    sets += ["method=clapp_pp", "train.epochs=0"] if method == "untrained" else [f"method={method}",
                                                                                  *schedule_overrides(setting)]
    began = time.monotonic()
    summary = launch_run(CONFIG, sets, out, progress=False)
    if summary.probe.get("scored_on") != "validation":
        raise ValueError(f"{out}: its probe was not scored on the validation images")
    probe = _cell(summary.probe)
    return {"run": str(out), "overrides": sets, "probes": {FIRST_PROBE: probe}, "images_per_s": summary.images_per_s,
            "wall_s": round(time.monotonic() - began, 1), "code_version": code_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{cpu_name()} ({available_cores()} cores)"}


def render(results: dict) -> str:
    trials, state = results["trials"], choose(results["trials"])
    lines = ["| trial | probe | validation, all blocks (%) | last block (%) | gain over untrained | wall (min) |",
             "|---|---|---:|---:|---:|---:|"]
    for key in sorted(trials, key=lambda k: trials[k]["date"]):
        method = key.split(", ")[0]
        for probe, found in trials[key]["probes"].items():
            untrained = trials.get(trial_key("untrained", "-", 0), {}).get("probes", {}).get(probe)
            difference = "-" if method == "untrained" or untrained is None else \
                f"{found['test_acc'] - untrained['test_acc']:+.2f}"
            wall = f"{trials[key]['wall_s'] / 60:.1f}" if probe == FIRST_PROBE else "-"
            lines.append(f"| {key} | {probe} | {found['test_acc']:.2f} | {found['per_block_test_acc'][-1]:.2f} | "
                         f"{difference} | {wall} |")
    chosen = ", ".join(f"{k}: {state[k]}" for k in ("setting", "steps", "probe") if k in state) or "nothing yet"
    left = len(state["todo"]) + len(state.get("probes", []))
    return "\n".join(lines) + f"\n\nChosen so far: {chosen}; trials left: {left}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.protocol_search", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="", help="CIFAR-10's folder (data.root)")
    parser.add_argument("--render", action="store_true", help="only render the results file")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "protocol_search", help="where run folders go")
    parser.add_argument("--jobs", type=positive, default=1,
                        help="trials run at once, one thread each (2 on 2 cores; their wall times then overlap)")
    args = parser.parse_args(argv)
    results = load_results()
    while not args.render:
        state = choose(results["trials"])
        if state["todo"]:
            with ThreadPoolExecutor(args.jobs) as pool:  # each trial is its own process: threads only wait
                running = {pool.submit(run_trial, method, setting, steps, args.data_root,
                                       args.runs / f"{method}_{setting.replace(' ', '_')}_{steps}"):
                           trial_key(method, setting, steps) for method, setting, steps in state["todo"][:args.jobs]}
                print(f"\n== trials {', '.join(running.values())}", flush=True)
                for done in as_completed(running):
                    results["trials"][running[done]] = done.result()
                    save_results(results)
        elif state.get("probes"):
            key, probe = state["probes"][0]
            print(f"\n== probe {probe} of {key}", flush=True)
            found = probe_finished_run(Path(results["trials"][key]["run"]), PROBES[probe], progress=False)
            results["trials"][key]["probes"][probe] = _cell(found)
        else:
            break
        save_results(results)  # each finished trial is kept, whatever happens next
        replace_between_markers(BENCHMARKS, START, END, render(results))
    text = render(results)
    print(text)
    replace_between_markers(BENCHMARKS, START, END, text)
    return 0


if __name__ == "__main__":
    run_program(main)
