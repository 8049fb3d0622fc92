"""The paper's theory figures: per-layer cosine of the local and the BP update in deep networks.

    python -m launch.theory FIGURE [--quick] [--out DIR] [--data-root DIR] [--seed N]

FIGURE is fig2, fig3a, fig3b or fig4 (method.md, section 5). Writes FIGURE.json and FIGURE.png
into DIR (default runs/theory_FIGURE_TIME). Data: Fashion-MNIST's train split; MLP inputs are
14x14 patches, the positive of a patch being the patch right below it in the same image (each
image gives two pairs, its left and its right column); the CNN of fig4 sees two random resized
16 px crops of each image. `--quick` shrinks every figure to under a minute on 2 cores and, only
then, falls back to the synthetic set when Fashion-MNIST is missing (and says so in the JSON).
fig3b trains four networks (hours on 2 CPU cores at the paper's size): each finished one is kept in
DIR/fig3b.partial.json, so the same command with the same --out resumes after an interruption.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from launch.machine import code_version
from launch.program import run_program
from layers.seeding import keyed_generator
from layers.theory.figures import FIGURES, FrozenCurve, TrainingSetup, frozen_figure, run_fig3b, run_frozen
from sim.data.datasets import DatasetInfo, DatasetMissing, ImageSet, dataset_info, load_split
from sim.data.views import SimCLRViews
from sim.record.progress import progress_bar

PATCH, CROP = 14, 16
_STREAM_CROPS, _STREAM_ORDER = 21, 22  # seeding streams: fig4's crops, fig3b's data order


@dataclasses.dataclass(frozen=True)
class Sizes:
    batches: int  # frozen-W figures: batches of `batch_images` images (the authors: 32 x 32)
    batch_images: int
    epochs: int  # fig3b
    train_images: int | None  # fig3b images per epoch; None = the whole train split (60,000)
    eval_batches: int  # fig3b: test batches the alignment is averaged over, after every epoch


FULL = Sizes(batches=32, batch_images=32, epochs=20, train_images=None, eval_batches=64)
QUICK = Sizes(batches=4, batch_images=32, epochs=2, train_images=512, eval_batches=4)


# ---------------------------------------------------------------- data
def load_data(root: str | None, quick: bool) -> tuple[DatasetInfo, ImageSet, ImageSet, str | None]:
    """(info, train split, test split, warning); the synthetic set only in quick mode."""
    name, warning = "fashion_mnist", None
    try:
        train = load_split(name, root, "train")
    except DatasetMissing as missing:
        if not quick:
            raise
        name, root = "synthetic_gray", None
        warning = ("Fashion-MNIST is missing, so this QUICK run uses the SYNTHETIC gratings "
                   f"(synthetic_gray) instead: its numbers say nothing about the paper. ({missing})")
        train = load_split(name, root, "train")
    return dataset_info(name), train, load_split(name, root, "test"), warning


def normalised(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (b, 1, S, S) -> float32, standardised with the dataset's pixel statistics."""
    return (images.float() / 255 - info.mean[0]) / info.std[0]


def patch_rows(images: torch.Tensor) -> torch.Tensor:
    """(b, 1, S, S) -> (4b, 196) in the project's row order: view 1 = the top patches (left column
    of every image, then right column), view 2 = the patches right below them, in the same order.
    The central 28x28 square is cut into four 14x14 patches (Fashion-MNIST is 28 px already)."""
    side, offset = 2 * PATCH, (images.shape[-1] - 2 * PATCH) // 2
    if offset < 0:
        raise ValueError(f"images of {images.shape[-1]} px are smaller than the {side} px the patches need")
    square = images[:, 0, offset:offset + side, offset:offset + side]  # (b, 28, 28)
    grid = square.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # (b, row, column, 14, 14)
    rows = grid.permute(1, 2, 0, 3, 4).flatten(3)  # (row, column, b, 196)
    return rows.reshape(-1, PATCH * PATCH)  # (4b, 196): top-left, top-right, bottom-left, bottom-right


def image_patches(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (b, 1, S, S) -> (4b, 196) standardised patch rows (see patch_rows)."""
    return patch_rows(normalised(images, info))


def crop_views(info: DatasetInfo) -> SimCLRViews:
    """fig4's views, uint8 (b, 1, S, S) -> (2b, 1, 16, 16): two random resized crops (scale 0.15
    to 1, as the authors' CNN script) of every image, normalised; no flip or colour change."""
    return SimCLRViews(dataclasses.replace(info, image_size=CROP), crop_scale=(0.15, 1.0), flip_p=0.0,
                       jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def frozen_batches(figure: str, data: ImageSet, info: DatasetInfo, sizes: Sizes, seed: int) -> list[torch.Tensor]:
    """The first batches x batch_images images of the train split, in order (as the authors)."""
    batches, views = [], crop_views(info)
    for i in range(sizes.batches):
        images, _ = data.batch(torch.arange(i * sizes.batch_images, (i + 1) * sizes.batch_images))
        if figure == "fig4":
            batches.append(views(images, keyed_generator(seed, _STREAM_CROPS, i)).double())
        else:
            batches.append(image_patches(images, info).double())
    return batches


# ---------------------------------------------------------------- figures
def run_figure(figure: str, quick: bool, data_root: str | None, seed: int = 0, progress: bool = True,
               train_images: int | None = None, partial: Path | None = None) -> dict:
    """Everything FIGURE.json holds. `train_images` caps fig3b's images per epoch; fig3b keeps
    each finished curve in `partial` and, run again with the same settings, does not retrain it."""
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; choose one of {', '.join(FIGURES)}")
    sizes = QUICK if quick else FULL
    if train_images is not None and figure != "fig3b":
        raise ValueError(f"--train-images sets fig3b's training set; {figure} trains nothing (W is frozen)")
    if train_images is not None:
        if train_images < sizes.batch_images:
            raise ValueError(f"--train-images {train_images} is less than one batch of {sizes.batch_images}")
        sizes = dataclasses.replace(sizes, train_images=train_images)
    info, train, test, warning = load_data(data_root, quick)
    if warning:
        print(f"\n{'!' * 100}\nWARNING: {warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    bar = _progress if progress else None
    start = time.perf_counter()
    result: dict = {"figure": figure, "quick": quick, "seed": seed, "code_version": code_version(),
                    "date": time.strftime("%Y-%m-%d"), "data": {"name": info.name, "warning": warning}}
    if figure == "fig3b":
        setup = TrainingSetup(epochs=sizes.epochs)
        count = len(train) if sizes.train_images is None else min(sizes.train_images, len(train))
        steps = count // sizes.batch_images

        def train_epoch(epoch: int) -> Iterator[torch.Tensor]:
            order = torch.randperm(len(train), generator=keyed_generator(seed, _STREAM_ORDER, epoch))
            order = order[:steps * sizes.batch_images]  # (steps * batch,) a fresh shuffle every epoch
            for index in order.view(steps, sizes.batch_images):
                yield image_patches(train.batch(index)[0], info)

        evals = [image_patches(test.batch(torch.arange(i * 32, (i + 1) * 32))[0], info)
                 for i in range(sizes.eval_batches)]
        settings = {**dataclasses.asdict(setup), "train_images_per_epoch": steps * sizes.batch_images,
                    "batch_images": sizes.batch_images, "eval_test_images": 32 * sizes.eval_batches,
                    "seed": seed, "data": info.name}
        finished = _load_partial(partial, settings)

        def keep(name: str, record: dict) -> None:
            finished[name] = record
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"settings": settings, "finished": finished}))

        curves, over_training = run_fig3b(train_epoch, steps, evals, setup, seed, bar, _log, dict(finished), keep)
        result["settings"] = settings
        result["over_training"] = over_training
    else:
        curves_spec, extra_spec = frozen_figure(figure, seed)
        batches = frozen_batches(figure, train, info, sizes, seed)
        curves, distances = run_frozen(curves_spec, batches, seed, bar)
        result["settings"] = {"batches": sizes.batches, "batch_images": sizes.batch_images,
                              "curves": {n: _describe(c) for n, c in {**curves_spec, **extra_spec}.items()}}
        if extra_spec:
            result["extra_curves"], extra_distances = run_frozen(extra_spec, batches, seed, bar)
            distances.update(extra_distances)
        result["relative_distance"] = distances  # per layer: mean over batches of ||local - BP|| / ||BP||
    result["curves"] = curves
    result["ci95"] = "half-width of the 95% interval of the mean over batches: 1.96 * std / sqrt(n)"
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _load_partial(path: Path | None, settings: dict) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved["settings"] != json.loads(json.dumps(settings)):
        raise ValueError(f"{path} holds curves of another fig3b setting; remove it or choose another --out")
    print(f"resuming fig3b: {', '.join(saved['finished'])} already done in {path}", flush=True)
    return saved["finished"]


def _describe(curve: FrozenCurve) -> dict:
    net = curve.build()
    return {"network": type(net).__name__, "widths": [w.shape[0] for w in net.weights], "activation": net.activation,
            "init": net.init, "pools": list(curve.pools), "context": curve.context, "b": curve.b_mode,
            "contrast": curve.spec.contrast, "negatives": curve.spec.negatives, "l2": curve.spec.l2}


def _log(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # above any progress bar


def _progress(iterable: Iterable, total: int, label: str) -> Iterable:
    with progress_bar(total, 0, True, desc=label, unit="it", leave=False) as bar:
        for item in iterable:
            yield item
            bar.update()


# ---------------------------------------------------------------- output
def plot(result: dict, path: Path) -> None:
    """Per-layer cosine with 95% error bars, one line per curve (extra curves dashed); fig3b adds
    layer 1's alignment over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if "over_training" in result else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    ax = axes[0, 0]
    lines = [(n, c, "-o") for n, c in result["curves"].items()]
    lines += [(n, c, "--x") for n, c in result.get("extra_curves", {}).items()]
    for i, (name, curve, style) in enumerate(lines):
        shift = 0.06 * (i - (len(lines) - 1) / 2)  # so that coinciding curves stay visible
        ax.errorbar([x + shift for x in curve["layers"]], curve["cosine_mean"], yerr=curve["cosine_ci95"],
                    fmt=style, ms=4, capsize=3, label=name)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="layer", ylabel="cosine(local update, BP update)", xticks=lines[0][1]["layers"], ylim=(-0.1, 1.05))
    ax.legend(fontsize=8)
    data = result["data"]["name"] + (", QUICK" if result["quick"] else "")
    ax.set_title(f"{result['figure']}: mean and 95% interval over batches ({data})", fontsize=9)
    if panels == 2:
        ax = axes[0, 1]
        for name, history in result["over_training"].items():
            ax.plot(history["epochs"], [m[0] for m in history["cosine_mean"]], "-o", ms=3, label=name)
        ax.set(xlabel="epoch", ylabel="cosine, layer 1", ylim=(-0.1, 1.05))
        ax.set_title("layer 1 during training", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.theory", description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=FIGURES, help="which figure of the paper")
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute on 2 cores")
    parser.add_argument("--out", type=Path, help="output folder (default runs/theory_FIGURE_TIME)")
    parser.add_argument("--data-root", help="folder holding Fashion-MNIST (default: the Debian package's)")
    parser.add_argument("--train-images", type=int, metavar="N",
                        help="fig3b: train on N images per epoch (default: all 60,000; --quick: 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and draws")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the matrices are small, more threads only contend)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"theory_{args.figure}_{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        result = run_figure(args.figure, args.quick, args.data_root, args.seed, not args.no_progress,
                            args.train_images, out / f"{args.figure}.partial.json")
    except DatasetMissing as error:
        print(f"error: {error}\n(here the folder is --data-root; only --quick falls back to the synthetic set)",
              file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.figure}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{args.figure}.png")
    (out / f"{args.figure}.partial.json").unlink(missing_ok=True)  # finished: nothing left to resume
    for name, curve in result["curves"].items():
        print(f"{name:>22}: " + " ".join(f"{m:6.3f}" for m in curve["cosine_mean"]))
    if result["data"]["warning"]:
        print(f"WARNING: data {result['data']['name']} (Fashion-MNIST was missing): not comparable with the paper")
    print(f"{args.figure}: {result['seconds']} s; wrote {out / args.figure}.json and .png")
    return 0


if __name__ == "__main__":
    run_program(main)
