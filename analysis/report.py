"""One self-contained HTML page about a run: its figures (PNG, embedded as base64 and also written next
to the page), its tables and its config. It needs only RUN_DIR/log.zarr; summary.json and config.toml
are used when present (summary.json is written when the run ends)."""
from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis import plots
from analysis.cka import blocks_cka
from analysis.gradient_alignment import block_alignment
from analysis.logged_probe import probe_logged_run
from analysis.store import LogError, RunLog
from sim.record.summary import RunSummary

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: 0.92em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, alt: str, written: list[Path]) -> str:
    written.append(path)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></p>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


def _overview(run: RunLog) -> str:
    a = run.attrs
    logged = {b: len(run.blocks[b].steps) if b in run.blocks else "not started" for b in range(int(a["num_blocks"]))}
    rows = [("method", a["method"]), ("dataset", a["dataset"]), ("code version", a["code_version"]),
            ("world size", a["world_size"]), ("placement (blocks per rank)", a["placement"]),
            ("logged every / gradient pairs every", f"{a['log_every']} / {a['align_every'] or '-'} steps"),
            ("held-out images (split)",
             f"{_fmt(run.num_images, 'd')} ({a['heldout_split']}), {a['num_classes']} classes"),
            ("logged steps per block", ", ".join(f"{b}: {n}" for b, n in logged.items()))]
    return _table(("", "value"), rows)


def _summary(summary: RunSummary | None) -> str:
    if summary is None:
        return _note("summary.json is not there yet: the run has not finished (the figures below use the log only).")
    probe = summary.probe or {}
    rows = [("steps", summary.steps), ("images per second", _fmt(summary.images_per_s, ".1f")),
            ("training seconds", _fmt(summary.train_seconds, ".1f")),
            ("schedule / feedback", f"{summary.schedule} / {summary.feedback or '-'}"),
            ("feedback delay per block (steps)", summary.feedback_delay_steps),
            (f"probe {probe.get('scored_on', 'test')} accuracy (run's own probe, %)",
             _fmt(probe.get("probe_accuracy"), ".2f")),
            ("probe per block (%)", " ".join(_fmt(v, ".1f") for v in probe.get("per_block_probe_accuracy", []))),
            ("loss per block (last 50 steps)", " ".join(_fmt(v) for v in summary.loss_per_block)),
            ("peak memory per process (MiB)", " ".join(f"{m / 2**20:.0f}" for m in summary.peak_memory_bytes))]
    out = _table(("", "value"), rows)
    if summary.ranks:
        out += _table(("rank", "blocks", "seconds", "waiting (s)", "sent (MiB)"),
                      [(r["rank"], r["blocks"], _fmt(r["seconds"], ".1f"), _fmt(r["wait_seconds"], ".1f"),
                        _fmt(r["bytes_sent"] / 2**20, ".2f")) for r in summary.ranks])
    return out


def _traffic_table(run: RunLog) -> str:
    rows = []
    for rank, blk in run.rank_blocks().items():
        seconds, sent = blk.series["step_seconds"], blk.series["bytes_sent"]
        rows.append((rank, _fmt(_nanmean(1e3 * seconds), ".1f"), _fmt(_nanmean(sent / 2**10), ".1f"), len(seconds)))
    return _table(("rank", "mean forward action (ms)", "mean sent per step (KiB)", "logged steps"), rows)


def _nanmean(values: np.ndarray) -> float | None:
    """The mean of the readable values (damaged rows are NaN), None if there is none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def build_report(run: RunLog, out_dir: Path, points: int = 20) -> list[Path]:
    """Write report.html and its PNGs into `out_dir` (the page first in the list returned); `points` logged
    steps per block are probed."""
    run.require_rows()
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    parts = [f"<h1>{html.escape(run.attrs['method'])} on {html.escape(run.attrs['dataset'])}</h1>",
             _note(f"run folder {run.run_dir.resolve()}"), _overview(run), _section("Summary", _summary(run.summary))]

    training = plots.plot_training(run, out_dir / "training.png")
    no_loss = [b for b, blk in sorted(run.blocks.items()) if not blk.attrs["has_loss"]]
    body = _image(training, "training signals", figures)
    if no_loss:
        body += _note(f"blocks {no_loss} have no loss of their own (end-to-end method): their loss is NaN, not drawn.")
    parts.append(_section("Loss and update size per block", body))

    try:
        alignment = block_alignment(run)
        body = _image(plots.plot_alignment(alignment, out_dir / "alignment.png"), "gradient alignment", figures)
        body += _table(("block", "pairs", "mean cosine", "95% interval"),
                       [(r.block, r.n, _fmt(r.mean, "+.4f"),
                         f"[{_fmt(r.mean - r.half_width, '+.4f')}, {_fmt(r.mean + r.half_width, '+.4f')}]")
                        for r in alignment])
        body += _note("Cosine between the gradient of each block's local loss and the gradient of the top block's "
                      "loss back-propagated to the same weights, on the same batch. Interval: mean +- 1.96 sd/sqrt(n) "
                      "over the logged pairs (correlated over steps, so optimistic). "
                      "The top block is 1 by construction.")
    except LogError as err:
        body = _note(str(err))
    parts.append(_section("Alignment with backprop", body))

    try:
        probe = probe_logged_run(run, points=points)
        body = _image(plots.plot_probe(probe, out_dir / "probe.png"), "probe accuracy", figures)
        body += _table(("block", "first step", "accuracy (%)", "last step", "accuracy (%)"),
                       [(b, int(probe.steps[b][0]), _fmt(100 * probe.accuracy[b][0], ".1f"), int(probe.steps[b][-1]),
                         _fmt(100 * probe.accuracy[b][-1], ".1f")) for b in probe.steps])
        body += _note(f"Ridge one-vs-all classifier on standardised logged features, fitted on {probe.fit_images} "
                      f"and scored on {probe.score_images} held-out images (stratified 70/30 split, fixed seed); "
                      f"chance {100 * probe.chance:.1f}%.")
    except LogError as err:  # e.g. the held-out labels are damaged: the other sections still stand
        body = _note(str(err))
    parts.append(_section("Linear probe per block over training", body))

    try:
        cka = blocks_cka(run)
        parts.append(_section("Similarity between blocks (linear CKA)",
                              _image(plots.plot_blocks_cka(cka, out_dir / "cka_blocks.png"), "CKA between blocks",
                                     figures)))
    except LogError as err:
        parts.append(_section("Similarity between blocks (linear CKA)", _note(str(err))))

    body = (_image(plots.plot_throughput(run, out_dir / "throughput.png"), "throughput and traffic", figures)
            + _traffic_table(run))
    body += _note("From each rank's lowest block: the wall time of the rank's forward action and the bytes it sent "
                  "during it, at the logged steps. Totals over the whole run are in the summary above.")
    parts.append(_section("Throughput and message traffic per rank", body))

    if run.damage:  # found while the sections above read the arrays: said next to the overview
        lines = "".join(f"<li>{html.escape(line)}</li>" for line in run.warnings())
        parts.insert(3, _section("Damaged log", f"<ul>{lines}</ul>" + _note(
            "These parts of the store could not be decoded; every figure and table is drawn without them.")))

    config_toml = run.run_dir / "config.toml"
    config = config_toml.read_text() if config_toml.exists() else json.dumps(run.attrs["config"], indent=2)
    parts.append(_section("Config", f"<pre>{html.escape(config)}</pre>"))

    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>laminar report: '
            f"{html.escape(run.name)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + "</body></html>\n")
    path = out_dir / "report.html"
    path.write_text(page)
    return [path, *figures]
