"""The linear-probe evaluation at the end of a run, of a trained (or random) encoder: the paper's concatenated probe and
one probe per block, trained side by side on features extracted without gradients."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from layers.linear_probe import LinearProbe, probe_features
from layers.model import grid_kernels
from layers.seeding import STREAM_PROBE, STREAM_VALIDATION, keyed_generator
from sim.data.datasets import DatasetInfo, ImageSet, load_split
from sim.data.views import plain_views, probe_views
from sim.record.progress import progress_bar
from sim.run.config import Config, ProbeConfig


def _batches(count: int, batch_size: int, order: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    order = torch.arange(count) if order is None else order
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


def sample_images(images: ImageSet, limit: int, seed: int) -> ImageSet:
    """`limit` images of a split drawn at random (0 = all): splits stored class by class stay balanced."""
    if limit <= 0 or limit >= len(images):
        return images
    chosen = torch.randperm(len(images), generator=keyed_generator(seed, STREAM_PROBE, -1))[:limit].sort().values
    return ImageSet(*images.batch(chosen))


def hold_out(images: ImageSet, count: int) -> tuple[ImageSet, ImageSet]:
    """(the rest, `count` held-out images) of a labeled split: the same images in every run, whatever
    its seed, so that settings chosen on them are compared on one validation set."""
    if not 0 < count < len(images):
        raise ValueError(f"probe.validation = {count} must be between 1 and {len(images) - 1}, the labeled "
                         f"training images less one; or 0 to score on the test set")
    order = torch.randperm(len(images), generator=keyed_generator(STREAM_VALIDATION))
    held, rest = order[:count].sort().values, order[count:].sort().values
    return ImageSet(*images.batch(rest)), ImageSet(*images.batch(held))


def probe_sets(config: Config, test_set: ImageSet | None = None) -> tuple[ImageSet, ImageSet]:
    """(the probe's training images, the images it is scored on) as `config.probe` asks: the test split, or
    with `probe.validation` held-out training images. `test_set`: the test split, if already read."""
    name, root, download, probe = config.data.name, config.data.root or None, config.data.download, config.probe
    train_set = load_split(name, root, "train", download)
    if probe.validation:  # choosing settings: the probe is scored on held-out training images
        train_set, scored = hold_out(train_set, probe.validation)
    else:
        scored = test_set if test_set is not None else load_split(name, root, "test", download)
    train_images = "training images left by probe.validation" if probe.validation else "training images"
    return (_limited(train_set, probe.train_limit, "probe.train_limit", train_images, config.train.seed),
            _limited(scored, probe.test_limit, "probe.test_limit",
                     "validation images" if probe.validation else "test images", config.train.seed))


def _limited(images: ImageSet, limit: int, key: str, what: str, seed: int) -> ImageSet:
    """`sample_images`, saying so when the limit `key` asks for more than the `what` there are: a number the
    probe cannot honour is said before the work (as log.heldout's), not changed unseen."""
    if limit > len(images):
        print(f"note: {key} = {limit} is more than the {len(images)} {what}: the probe uses all {len(images)}",
              flush=True)
    return sample_images(images, limit, seed)


def linear_probe(
    blocks: Sequence[nn.Module],
    info: DatasetInfo,
    train_set: ImageSet,
    test_set: ImageSet,
    settings: ProbeConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> dict:
    """Train the probes for `settings.epochs` epochs with Adam and report the last epoch's test
    accuracy (percent) on `test_set`: `probe_accuracy` for the concatenated probe,
    `per_block_probe_accuracy` for each block (`probe_encoder` says which images those were)."""
    epochs, batch_size, augment = settings.epochs, settings.batch_size, settings.augment
    kernels = grid_kernels(info.image_size)
    for block in blocks:
        block.eval()
    sample = plain_views(train_set.batch(torch.arange(2))[0], info, device)
    dims = [f.shape[1] for f in probe_features(blocks, sample, kernels)]
    torch.manual_seed(seed)
    probe = LinearProbe(dims, info.num_classes, settings.standardize).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=settings.lr)
    if augment:  # fresh crops and flips every epoch: features are extracted batch by batch
        def epoch_batches(generator: torch.Generator) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
            for index in _batches(len(train_set), batch_size, torch.randperm(len(train_set), generator=generator)):
                images, labels = train_set.batch(index)
                x = probe_views(images, info, generator, device)
                yield probe_features(blocks, x, kernels), labels.to(device)
    else:  # the same images every epoch: extract their features once
        extracted = [(probe_features(blocks, plain_views(images, info, device), kernels), labels.to(device))
                     for images, labels in map(train_set.batch, _batches(len(train_set), batch_size))]
        all_features = [torch.cat(parts) for parts in zip(*(f for f, _ in extracted))]  # each (N, D_l)
        all_labels = torch.cat([labels for _, labels in extracted])
        del extracted

        def epoch_batches(generator: torch.Generator) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
            for index in _batches(len(all_labels), batch_size, torch.randperm(len(all_labels), generator=generator)):
                index = index.to(device)
                yield [f[index] for f in all_features], all_labels[index]

    total = epochs * -(-len(train_set) // batch_size)
    with progress_bar(total, 0, progress, desc="probe", unit="batch") as bar:
        for epoch in range(epochs):
            for features, labels in epoch_batches(keyed_generator(seed, STREAM_PROBE, epoch)):
                if len(labels) < 2:  # batch statistics need two rows: a last batch of one image is skipped
                    continue
                optimizer.zero_grad(set_to_none=True)
                probe.loss(features, labels).backward()
                optimizer.step()
                bar.update()
    probe.eval()
    correct = torch.zeros(len(blocks) + 1)
    for index in _batches(len(test_set), batch_size):
        images, labels = test_set.batch(index)
        correct += probe.correct(probe_features(blocks, plain_views(images, info, device), kernels),
                                 labels.to(device)).cpu()
    accuracy = (100.0 * correct / len(test_set)).tolist()
    return {"probe_accuracy": accuracy[-1], "per_block_probe_accuracy": accuracy[:-1], "epochs": epochs,
            "train_images": len(train_set), "scored_images": len(test_set)}


def probe_encoder(blocks: Sequence[nn.Module], info: DatasetInfo, train_set: ImageSet, scored_set: ImageSet,
                  config: Config, *, device: torch.device, progress: bool = True) -> dict:
    """The final probe of a run's encoder under `config` (the job's, and launch.probe's of a finished
    run), with `scored_on` saying which images `scored_set` is: "validation" or "test"."""
    result = linear_probe(blocks, info, train_set, scored_set, config.probe, seed=config.train.seed, device=device,
                          progress=progress)
    result["scored_on"] = "validation" if config.probe.validation else "test"
    return result
