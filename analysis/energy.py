"""What one learned image costs in energy: summary.json's `accounting` (sim/run/accounting.py) times a
table of energy per operation and per bit moved, split into compute, memory and communication.

The default table, 45 nm at 0.9 V, from M. Horowitz, "Computing's energy problem (and what we can do
about it)", ISSCC 2014:
- a multiply-accumulate in float32: a multiply (3.7 pJ) and an add (0.9 pJ), 4.6 pJ;
- a DRAM access, 1.3 to 2.6 nJ per 64 bits: 20.3 pJ per bit (the low end);
- a link between chips is not in that table: 10 pJ per bit is an assumption of the order of chip-to-chip
  serial links, to be replaced with your interconnect's figure.
A TOML file with the keys of DEFAULT_TABLE (any of them) replaces these (`--table FILE`).

The model, per block and image: compute = (forward + update + backward multiply-accumulates) x the MAC
energy; memory = every byte of state the block holds (weights, gradients and AdamW moments; the
activity kept for its update; stashed weights) written and read once per step, over the step's images,
at the DRAM energy; communication (per run) = the bytes sent between processes per image at the link
energy. Element-wise work, caches and the data pipeline are left out. A run written before laminar
counted its operations has no `accounting`: its compute and memory are not estimated (the output says
so), only its communication, from the bytes its ranks sent.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from analysis.damage import LogError
from analysis.store import read_summary

DEFAULT_TABLE = {"mac_pj": 3.7 + 0.9, "memory_pj_per_bit": 1300 / 64, "link_pj_per_bit": 10.0}
PARTS = ("compute", "memory", "communication")


def load_table(path: Path | None) -> dict[str, float]:
    """DEFAULT_TABLE with the values of the TOML file at `path`, checked."""
    table = dict(DEFAULT_TABLE)
    if path is None:
        return table
    try:
        given = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise LogError(f"--table {path}: not a readable TOML file ({error})") from None
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise LogError(f"--table {path}: unknown keys {unknown}; the table takes {sorted(table)} (picojoules)")
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise LogError(f"--table {path}: {key} = {value!r}; give a number of picojoules >= 0")
        table[key] = float(value)
    return table


@dataclass
class RunEnergy:
    name: str
    blocks: dict[str, dict[str, float]]  # block -> macs, synaptic_ops, memory_bytes, compute_uj, memory_uj
    communication_uj: float | None
    missing: str | None = None  # what the run's files cannot say

    def total(self, part: str) -> float | None:
        if part == "communication":
            return self.communication_uj
        values = [b[f"{part}_uj"] for b in self.blocks.values()]
        return sum(values) if values else None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {f"{p}_uj_total": self.total(p) for p in PARTS}


def run_energy(run_dir: Path, table: dict[str, float]) -> RunEnergy:
    summary = read_summary(run_dir)
    if summary is None:
        raise LogError(f"{run_dir}: no summary.json; give a finished run folder")
    link = table["link_pj_per_bit"] * 1e-6  # microjoules per bit
    accounting = summary.accounting
    if accounting is None:
        images = summary.steps * summary.replicas * summary.config["train"]["batch_size"]
        sent = sum(r["bytes_sent"] for r in summary.ranks)
        return RunEnergy(run_dir.name, {}, 8 * sent / images * link if images else None,
                         "written before laminar counted operations (summary.json has no 'accounting'): compute "
                         "and memory unknown")
    batch = summary.config["train"]["batch_size"]
    blocks = {}
    for block, entry in accounting["blocks"].items():
        macs = entry["forward_macs"] + entry["update_macs"] + entry["backward_macs"]
        moved = 2 * sum(entry["state_bytes"].values()) / batch  # written and read once a step
        blocks[block] = {"macs": macs, "synaptic_ops": entry["synaptic_ops"], "memory_bytes": moved,
                         "compute_uj": macs * table["mac_pj"] * 1e-6,
                         "memory_uj": 8 * moved * table["memory_pj_per_bit"] * 1e-6}
    sent = sum(accounting["bytes_sent_per_image"].values())
    return RunEnergy(run_dir.name, blocks, 8 * sent * link)


def energy_table(runs: list[RunEnergy], table: dict[str, float]) -> str:
    lines = [f"energy per learned image (microjoules), with {', '.join(f'{k} = {v:.3g}' for k, v in table.items())}"]
    for run in runs:
        lines.append(f"\n{run.name}" + (f": {run.missing}" if run.missing else ""))
        if run.blocks:
            lines.append("block  M multiply-accumulates  M synaptic ops  memory KiB  compute uJ  memory uJ")
            for block, b in run.blocks.items():
                synaptic = "-" if b["synaptic_ops"] is None else f"{b['synaptic_ops'] / 1e6:.2f}"
                lines.append(f"{block:>5}  {b['macs'] / 1e6:>22.2f}  {synaptic:>14}  {b['memory_bytes'] / 1024:>10.1f}"
                             f"  {b['compute_uj']:>10.2f}  {b['memory_uj']:>9.2f}")
        totals = [f"{p} {'unknown' if v is None else f'{v:.2f} uJ'}" for p, v in ((p, run.total(p)) for p in PARTS)]
        lines.append("total: " + ", ".join(totals))
    return "\n".join(lines)


def plot_energy(runs: list[RunEnergy], path: Path,
                title: str = "energy per learned image: compute, memory, communication") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(runs) + 2), 4.5))
    bottom = [0.0] * len(runs)
    for part, colour in zip(PARTS, ("tab:blue", "tab:orange", "tab:green")):
        values = [run.total(part) or 0.0 for run in runs]
        ax.bar([run.name for run in runs], values, bottom=bottom, color=colour, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, run in enumerate(runs):
        if run.missing:
            ax.annotate("compute, memory unknown", (x, bottom[x]), ha="center", fontsize=7, xytext=(0, 3),
                        textcoords="offset points")
    ax.set_ylabel("energy per learned image (uJ)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
