"""Run configuration: typed, nested dataclasses filled from TOML, validated strictly.

Defaults live here and only here (those of `[rule]` in layers.block.RuleSettings, which the blocks take
as it is). Unknown keys and wrong types are errors that name the key;
`--set key=value` overrides are read as TOML values (`--set rule.pool=[4,4,4,2,2,1]`), and a value
that is not valid TOML is taken as a plain string (`--set method=clapp_pp`).
"""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layers.encoder import CHANNELS, NUM_BLOCKS
from layers.learning_rate import LR_SCHEDULES
from layers.losses import CONTRAST_MODES, NEGATIVE_MODES
from layers.model import pool_kernels
from layers.rules import get_rule
from layers.rules.rule import RuleSettings
from sim.data.datasets import dataset_info
from sim.errors import ConfigError
from sim.pipeline.codec import CODECS
from sim.pipeline.free_running import ASYNC, FreeRunning
from sim.pipeline.placement import check_groups
from sim.pipeline.schedule import Schedule
from sim.record.log_format import ACTIVATIONS


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | stl10 | tiny_imagenet | synthetic | synthetic_gray
    root: str = ""  # folder holding the dataset; "" = the dataset's default location
    download: bool = False  # let torchvision fetch the dataset into `root` if it is missing


@dataclass
class ModelConfig:
    width: float = 1.0  # channel multiplier of VGG-6 (1.0 = the paper)


@dataclass
class OptimConfig:
    lr: float = 2e-4  # AdamW, one per block
    weight_decay: float = 0.0
    fused: bool = True  # one fused AdamW kernel per block; false: torch's default AdamW (equal up to rounding)
    schedule: str = "constant"  # constant (the paper's) | cosine: decay from lr to lr_min over the run
    warmup_steps: int = 0  # linear warm-up to lr over the first steps (either schedule)
    lr_min: float = 0.0  # where the cosine ends, at the last step


@dataclass
class TrainConfig:
    steps: int = 0  # optimiser steps; 0 = as many as `epochs` takes
    epochs: float = 1.0  # passes over the SSL split, used when steps = 0 (0 and 0: an untrained encoder)
    batch_size: int = 32  # images per step (each gives two views)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # glibc: large freed blocks stay in the process while it trains: "auto" where it pays, true, false
    keep_freed_memory: bool | str = "auto"  # (sim.run.freed_memory)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end


@dataclass
class ProbeConfig:
    epochs: int = 10  # 0 skips the probe
    batch_size: int = 256
    lr: float = 1e-3  # Adam
    augment: bool = True  # crop + flip on the probe's training images
    standardize: bool = True  # standardise each feature (BatchNorm without affine) before the linear layer
    train_limit: int = 0  # use only the first N labeled training images; 0 = all
    test_limit: int = 0  # use only the first N test images; 0 = all
    # > 0: score on this many labeled training images held out of the probe's training set (the same
    # ones in every run), never on the test set: for choosing settings (BENCHMARKS.md, the protocol)
    validation: int = 0


@dataclass
class SimConfig:
    # sequential | pipelined (used when there are several processes) | async: free-running block groups,
    # simulated on a virtual clock in one process, or one group per process (sim.pipeline.free_running)
    schedule: str = "pipelined"
    feedback: str = "exact"  # exact | delayed: when top-down feedback updates are applied
    # steps d between a batch's forward and its top-down update, the same for every block that waits
    # (issue 24): 0 is exact feedback; -1 leaves it to sim.feedback (delayed: K - 1 - r on rank r)
    feedback_delay: int = -1
    # a block waiting for feedback keeps the weights of its forward pass (true), or only its input and
    # pooled activity, an eligibility trace, and learns with its current weights when the feedback comes
    stash: bool = True
    placement: str | list[list[int]] = "auto"  # "auto" or contiguous block groups, one per process
    # async: the mailbox of each link holds sim.mailbox_depth messages; newest: the receiver takes the newest
    # (older ones dropped), fifo: the oldest, and a sender waits while the mailbox is full
    mailbox: str = "newest"
    mailbox_depth: int = 1
    block_speed: list[float] = field(default_factory=list)  # async: per block, 0.25 = 4x slower; []: all 1
    block_time: list[float] = field(default_factory=list)  # async: per block time per batch; []: the cost model's
    speed_jitter: float = 0.0  # async: sd of the log of each group's time per batch (seeded)
    # async on K processes: each group's forward lasts at least pace_s x its time on the virtual clock (a
    # one-process step at speed 1 takes 1), sleeping the rest; 0: as fast as it computes (a block_speed < 1
    # then sleeps in proportion to the measured compute)
    pace_s: float = 0.0
    # what the blocks' messages become on the wire (sim.pipeline.codec): fp32 | fp16 | bf16 | int8 | int4 | spike;
    # codec: every block's output to the next block; codec_feedback: the top block's context, down
    codec: str = "fp32"
    codec_feedback: str = "fp32"
    timeout_s: float = 60.0  # longest wait for a message before the run stops with an error
    # data-parallel replicas R of the whole pipeline: R x K processes, a step takes R x train.batch_size
    # images (each replica train.batch_size of them), gradients averaged over the replicas (sim.pipeline.replicas)
    replicas: int = 1


@dataclass
class LogConfig:
    every: int = 100  # steps between logged steps in RUN_DIR/log.zarr; 0: no log
    align_every: int = 500  # steps between gradient-alignment pairs (local vs back-propagated); 0: none
    heldout: int = 512  # held-out (test) images whose pooled activity is logged (and probed offline)
    dtype: str = "float16"  # of the logged activity: float16 | float32
    chunk: int = 16  # logged steps per zarr chunk


@dataclass
class Config:
    method: str = "clapp_pp"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rule: RuleSettings = field(default_factory=RuleSettings)  # defined with the blocks that use it
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _check_type(key: str, value: Any, kind: Any) -> Any:
    """`value` converted to `kind`, or a ConfigError naming the key."""
    if isinstance(kind, types.UnionType):
        for alternative in typing.get_args(kind):
            try:
                return _check_type(key, value, alternative)
            except ConfigError:
                pass
        names = " or ".join(str(a).replace("typing.", "") if typing.get_origin(a) else a.__name__
                            for a in typing.get_args(kind))
        raise ConfigError(f"{key} must be {names}, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, list):
            return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be {getattr(kind, '__name__', kind)}, got {value!r} ({type(value).__name__})")


def _fill(target: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    for name, value in values.items():
        key = prefix + name
        if name not in hints:
            known = ", ".join(prefix + f for f in hints)
            raise ConfigError(f"unknown config key {key!r}; known keys here: {known}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; write [{key}] or {key}.<key> = ...")
            _fill(current, value, key + ".")
        else:
            setattr(target, name, _check_type(key, value, hints[name]))


def parse_override(text: str) -> dict[str, Any]:
    """'a.b=value' -> {'a': {'b': value}}, the value read as TOML, else as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    nested: dict[str, Any] = {}
    node = nested
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The defaults, then the TOML file at `path`, then each `--set` override, in that order."""
    config = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(_folder_given(path))
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; shipped configs are in launch/configs/")
        try:
            _fill(config, tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
    for text in overrides:
        _fill(config, parse_override(text))
    validate(config)
    return config


def _folder_given(folder: Path) -> str:
    """What to give instead of a folder: the TOML files it holds, by name, or where the shipped ones are."""
    found = sorted(folder.glob("*.toml"))
    if not found:
        return (f"config {folder} is a folder without .toml files; give a TOML file (the shipped configs are in "
                "launch/configs/)")
    more = f", and {len(found) - 8} more" if len(found) > 8 else ""
    return f"config {folder} is a folder; give one of its TOML files: {', '.join(map(str, found[:8]))}{more}"


MIN_CHANNELS = 4  # fewer channels in a block and its contrast has almost nothing to work with
DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")


def validate(config: Config) -> None:
    """Checks of values (types were checked while filling)."""
    for key, value in _numbers(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} = {value} is not a finite number; give a number")
        if isinstance(value, int) and abs(value) >= 2**63:  # steps and seeds travel as 64-bit integers
            raise ConfigError(f"{key} = {value} is too large; give a number below 2**63")
    if 0 < config.probe.train_limit < 2:
        raise ConfigError("probe.train_limit = 1: the probe needs at least 2 training images (or 0: all)")
    if not DEVICES.fullmatch(config.train.device):
        raise ConfigError(f"train.device = {config.train.device!r} is not one of auto, cpu, cuda, cuda:N")
    if config.model.width > 0:
        check_width(config.model.width)
    try:
        method = get_rule(config.method)
        info = dataset_info(config.data.name)
        pool_kernels(method, info.image_size, config.rule.pool or None)  # a pooling that does not fit fails here
        method.check_settings(config.rule)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    choices = {"optim.schedule": (config.optim.schedule, LR_SCHEDULES), "sim.codec": (config.sim.codec, CODECS),
               "sim.codec_feedback": (config.sim.codec_feedback, CODECS),
               "rule.contrast": (config.rule.contrast, CONTRAST_MODES),
               "rule.negatives": (config.rule.negatives, NEGATIVE_MODES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}")
    if isinstance(config.train.keep_freed_memory, str) and config.train.keep_freed_memory != "auto":
        raise ConfigError(f"train.keep_freed_memory = {config.train.keep_freed_memory!r}: use \"auto\" (keep where "
                          "the process's weights and optimiser state outweigh its activity), true or false")
    if config.train.batch_size < 2:
        raise ConfigError("train.batch_size must be >= 2 (negatives come from other images), "
                          f"got {config.train.batch_size}")
    try:
        if config.sim.schedule == ASYNC:
            check_free_running(config.sim)
        else:
            Schedule(config.sim.schedule, config.sim.feedback, (), feedback_delay=config.sim.feedback_delay)
        if isinstance(config.sim.placement, list):
            check_groups(config.sim.placement, len(config.sim.placement))
        elif config.sim.placement != "auto":
            raise ValueError(f"sim.placement = {config.sim.placement!r}: use \"auto\" or groups like "
                             "[[0, 1, 2], [3, 4, 5]]")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for key in ("model.width", "optim.lr", "sim.timeout_s", "sim.replicas", "probe.batch_size", "probe.lr",
                "rule.proj_dim", "rule.temperature"):
        if getattr_path(config, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr_path(config, key)}")
    if config.log.dtype not in ACTIVATIONS.dtypes:
        raise ConfigError(f"log.dtype = {config.log.dtype!r} is not one of {', '.join(ACTIVATIONS.dtypes)}")
    if config.log.chunk < 1 or (config.log.every and config.log.heldout < 1):
        raise ConfigError("log.chunk and log.heldout must be >= 1 when log.every > 0")
    if not 0 <= config.optim.lr_min <= config.optim.lr:
        raise ConfigError(f"optim.lr_min = {config.optim.lr_min} must be between 0 and optim.lr = {config.optim.lr}")
    for key in ("optim.warmup_steps", "log.every", "log.align_every", "train.steps", "train.epochs", "train.threads",
                "train.checkpoint_every", "probe.epochs", "probe.train_limit", "probe.test_limit", "probe.validation"):
        if getattr_path(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr_path(config, key)}")


def check_free_running(sim: SimConfig) -> None:
    """The async keys, before any plan (the plan checks them against the blocks and the rule)."""
    if sim.feedback != "exact" or sim.feedback_delay != -1:
        raise ValueError("sim.feedback and sim.feedback_delay do not apply to sim.schedule = 'async': feedback "
                         "arrives when the top group sends it; leave them at 'exact' and -1")
    FreeRunning(((0,),), (1.0,), (1.0,), (False,), sim.mailbox_depth, sim.mailbox, sim.speed_jitter)
    if not (math.isfinite(sim.pace_s) and sim.pace_s >= 0):
        raise ValueError(f"sim.pace_s = {sim.pace_s}: give seconds >= 0 (0: as fast as it computes)")
    for key, values in (("sim.block_speed", sim.block_speed), ("sim.block_time", sim.block_time)):
        if values and len(values) != NUM_BLOCKS:
            raise ValueError(f"{key} has {len(values)} values; give one per block ({NUM_BLOCKS}), or [] for the "
                             "default")
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"{key} = {values}: every value must be a number > 0")


def check_width(width: float) -> None:
    """A width multiplier that leaves every block at least MIN_CHANNELS channels."""
    for block, full in enumerate(CHANNELS):
        if round(full * width) < MIN_CHANNELS:
            raise ConfigError(f"model.width = {width} leaves block {block} with {round(full * width)} channels "
                              f"({full} at width 1.0); every block needs at least {MIN_CHANNELS}: use model.width "
                              f">= {MIN_CHANNELS / min(CHANNELS)}")


def _numbers(node: Any, prefix: str = "") -> Iterator[tuple[str, float | int]]:
    """Every number setting of `node` (a config or one of its sections), with its key."""
    for item in dataclasses.fields(node):
        value, key = getattr(node, item.name), prefix + item.name
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def getattr_path(config: Config, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The resolved config as TOML (written into every run folder)."""
    values = to_dict(config)
    lines = [f"method = {_toml_value(values.pop('method'))}"]
    for section, entries in values.items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in entries.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
