"""Time training steps of one method in one process, in this checkout or in another commit's tree.

    python launch/bench/step_timer.py --method clapp_pp --threads 1 [--tree DIR --baseline] [--steps N]

Run as a file, not a module, by `launch.bench.speed`, so that `--tree` decides which code is timed:
the tree's folder goes first on the import path before anything of laminar is imported. With
`--baseline` the tree is an older commit: its blocks are built through the layers API that every
commit since 8c06083 has (`build_blocks(rule, settings, ...)`, `make_stage`), with none of this
checkout's speed-ups. Without it, blocks are built as `launch.train` builds them (`Plan`), with
the speed-ups its config turns on, and `--set` and `--blocks` may change the config and train some
blocks only (what one process of a layer-parallel run holds; its input: random activity of the block
below's shape). Each step is a full training step of those blocks on synthetic views (2B x 3 x 32 x 32,
the same in both; without --baseline, the config's image size); prints one JSON line: seconds of each
step, peak memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def _peak_memory_class() -> type:
    """This checkout's sim.record.peak_memory.PeakMemory, loaded from its file: the tree under test may be older."""
    spec = importlib.util.spec_from_file_location("laminar_peak_memory", CHECKOUT / "sim" / "record" / "peak_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeakMemory


def build_stage(method: str, width: float, batch: int, baseline: bool, overrides: list[str], blocks: list[int]):
    """The blocks of `method` (all six, or `blocks` of them) in one process, as a stage with `forward(x, step)`,
    the speed-ups in effect and the shape of the stage's input, (2B, C, H, W)."""
    import torch

    import layers
    import sim
    # What the tree holds decides which API it has (not an import that fails: the editable install of this
    # checkout would answer for modules the tree lacks).
    if (Path(sim.__file__).parent / "pipeline").is_dir():
        from sim.pipeline.stage import make_stage
    else:  # a tree from before sim's rooms (issue 23)
        from sim.stage import make_stage
    if baseline:  # the layers API of every commit since 8c06083, before and after rules became objects
        import inspect

        from layers.model import build_blocks
        if (Path(layers.__file__).parent / "rules").is_dir():
            from layers.rules import get_rule as rule_named
            from layers.rules.rule import RuleSettings
        else:
            from layers.block import RuleSettings
            from layers.methods import get_method as rule_named
        # torch's default AdamW where the tree can choose it (not fused: none of this checkout's speed-ups)
        fused = {"fused_optimizer": False} if "fused_optimizer" in inspect.signature(build_blocks).parameters else {}
        blocks = build_blocks(rule_named(method), RuleSettings(), width=width, in_channels=3, input_size=32, seed=0,
                              lr=2e-4, weight_decay=0.0, **fused)
        return make_stage(blocks, 0), {}, (2 * batch, 3, 32, 32)
    from layers.encoder import describe_encoder
    from sim.run.config import load_config
    from sim.run.job import speedups
    from sim.run.plan import make_plan
    config = load_config(None, [f"method={method}", "data.name=synthetic", f"model.width={width}",
                                f"train.batch_size={batch}", *overrides])
    plan = make_plan(config, 1)
    in_effect = speedups(config, plan.held_memory(blocks))  # before the blocks allocate, as in a run
    image = (plan.info.channels, plan.info.image_size, plan.info.image_size)
    given = image if blocks[0] == 0 else describe_encoder(width, *image[:2])[blocks[0] - 1].output_shape
    stage = make_stage(plan.build_blocks(blocks, torch.device("cpu")), config.train.seed)
    return stage, in_effect, (2 * batch, *given)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tree", type=Path, default=CHECKOUT, help="the code to time (default: this checkout)")
    parser.add_argument("--baseline", action="store_true", help="the tree is an older commit: its layers API only")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first ones allocate)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (not with --baseline), e.g. data.name=synthetic_96")
    parser.add_argument("--blocks", default="0,1,2,3,4,5",
                        help="the blocks to train, consecutive (not with --baseline)")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    if args.baseline and (args.set or blocks != list(range(6))):
        parser.error("--set and --blocks need this checkout's config, not a --baseline tree")
    sys.path[0] = str(args.tree.resolve())  # instead of this script's folder: the tree's packages come first
    import torch
    torch.set_num_threads(args.threads)
    import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: an import, not work)

    memory = _peak_memory_class()(torch.device("cpu"))
    memory.start()
    stage, speedups, shape = build_stage(args.method, args.width, args.batch, args.baseline, args.set, blocks)
    views = torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # (2B, C, H, W)
    if blocks[0] > 0:
        views = views.relu_()  # what a block's ReLU would send
    seconds = []
    for step in range(args.warmup + args.steps):
        began = time.perf_counter()
        stage.forward(views, step)
        seconds.append(time.perf_counter() - began)
    print(json.dumps({"method": args.method, "threads": args.threads, "tree": str(args.tree),
                      "baseline": args.baseline, "blocks": blocks, "warmup_seconds": seconds[:args.warmup],
                      "step_seconds": seconds[args.warmup:], "peak_memory_bytes": memory.peak_bytes(),
                      "speedups": speedups}))


if __name__ == "__main__":
    main()
