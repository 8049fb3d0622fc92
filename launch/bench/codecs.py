"""Issue 25's study: accuracy against the bytes the blocks send each other, per message codec.

    python -m launch.bench.codecs --data-root ../shared/data/cifar10                # resumable
    python -m launch.bench.codecs --data-root ../shared/data/cifar10 --reverse      # beside it, the other core
    python -m launch.bench.codecs --render                                          # table + figure only

Each cell is one run of the CPU-scale protocol (CIFAR-10 JPEG q75, width 1/8, batch 32), shortened to
STEPS steps like the dynamics study, on one process: with any codec, one process and two end with the
same weights bit for bit (tests/test_codec.py), so a cell's accuracy is the 2-process run's. Its bytes
per image are what 2 processes would send (the placement's one activation message up, and for rules
with top-down feedback its context down), computed from the codecs' packing, which the tests check
against the bytes a 2-process run counts.
"""
from __future__ import annotations

from pathlib import Path

from launch.bench.study import Cell, Study, study_main
from launch.program import run_program
from sim.pipeline.codec import Codec
from sim.run.config import load_config
from sim.run.plan import make_plan

ROOT = Path(__file__).parents[1]  # launch/
STUDY = Study(ROOT / "results" / "codecs.json", ROOT / "configs" / "protocol_cpu.toml", 2000)
FIGURE = ROOT / "results" / "codecs.png"
MARKERS = ("<!-- codecs:start -->", "<!-- codecs:end -->")
CODECS = ("fp32", "fp16", "int8", "int4", "spike")


def cells() -> list[Cell]:
    """Each rule with each activation codec; clapp_pp_dfb also with each feedback codec."""
    found = [(f"{rule}/{codec}/fp32", [f"method={rule}", f"sim.codec={codec}"],
              {"rule": rule, "codec": codec, "codec_feedback": "fp32"})
             for rule in ("clapp_pp", "clapp_pp_dfb") for codec in CODECS]
    found += [(f"clapp_pp_dfb/fp32/{codec}", ["method=clapp_pp_dfb", f"sim.codec_feedback={codec}"],
               {"rule": "clapp_pp_dfb", "codec": "fp32", "codec_feedback": codec}) for codec in CODECS[1:]]
    return found


def bytes_per_image(rule: str, codec: str, codec_feedback: str, config_path: Path = STUDY.config,
                    overrides: tuple[str, ...] = ("data.name=cifar10",)) -> float:
    """What 2 processes of the study's protocol (or of `config_path` with `overrides`) send each other
    per image, as the codecs pack it: rank 0's activations, and the top rank's context if any."""
    config = load_config(config_path, [*overrides, f"method={rule}", "log.every=0"])
    plan = make_plan(config, 2)
    sent = Codec(codec).message_bytes(plan.shapes.activations[0])
    if plan.rule.needs_feedback:
        sent += Codec(codec_feedback).message_bytes(plan.shapes.feedback)
    return sent / config.train.batch_size


def render(results: dict) -> str:
    lines = [f"CIFAR-10 (JPEG q75), {STUDY.steps} steps of the CPU protocol, seed 0; bytes per image that 2 "
             "processes send each other (activations up, for clapp_pp_dfb also the context down).", "",
             "| rule | activations | feedback | bytes per image | probe, all blocks (%) | probe, last block (%) |",
             "|---|---|---|---:|---:|---:|"]
    for key in sorted(results["cells"]):
        c = results["cells"][key]
        lines.append(f"| {c['rule']} | {c['codec']} | {c['codec_feedback'] if c['rule'] == 'clapp_pp_dfb' else '-'} "
                     f"| {bytes_per_image(c['rule'], c['codec'], c['codec_feedback']):,.0f} | "
                     f"{c['probe_accuracy']:.2f} | {c['last_block_accuracy']:.2f} |")
    return "\n".join(lines)


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = (("clapp_pp, activations coded", "tab:blue", "codec", lambda c: c["rule"] == "clapp_pp"),
              ("clapp_pp_dfb, activations coded", "tab:green", "codec",
               lambda c: c["rule"] == "clapp_pp_dfb" and c["codec_feedback"] == "fp32"),
              ("clapp_pp_dfb, feedback coded", "tab:olive", "codec_feedback",
               lambda c: c["rule"] == "clapp_pp_dfb" and c["codec"] == "fp32"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, colour, varied, belongs in series:
        points = sorted((bytes_per_image(c["rule"], c["codec"], c["codec_feedback"]), c["probe_accuracy"], c[varied])
                        for c in results["cells"].values() if belongs(c))
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=label)
        for x, y, name in points:
            ax.annotate(name, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # the minor decades' labels overlap
    ax.set_xlabel("bytes per image between 2 processes")
    ax.set_ylabel("probe accuracy, all blocks (%)")
    ax.legend(fontsize=8)
    fig.suptitle(f"what the messages carry, CIFAR-10 (JPEG q75), {STUDY.steps} steps, width 1/8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, name="codecs", doc=__doc__, study=STUDY, cells=cells, render=render, draw=draw,
                      figure=FIGURE, markers=MARKERS)


if __name__ == "__main__":
    run_program(main)
