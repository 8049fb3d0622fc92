"""Time training steps of one method in one process, in this checkout or in another commit's tree.

    python launch/bench/step_timer.py --method clapp_pp --threads 1 [--tree DIR --baseline] [--steps N]

Run as a file, not a module, by `launch.bench.speed`, so that `--tree` decides which code is timed:
the tree's folder goes first on the import path before anything of laminar is imported. With
`--baseline` the tree is an older commit: its blocks are built through the layers API that every
commit since 8c06083 has (`build_blocks(rule, settings, ...)`, `make_stage`), with none of this
checkout's speed-ups. Without it, blocks are built as `launch.train` builds them (`Plan`), with
the speed-ups its config turns on. Each step is a full training step of every block on synthetic
views (2B x 3 x 32 x 32, the same in both); prints one JSON line: seconds of each step, peak memory.
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


def build_stage(method: str, width: float, batch: int, baseline: bool):
    """The blocks of every stage of `method` in one process, as a stage with `forward(x, step)`."""
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
        return make_stage(blocks, 0), {}
    from sim.run.config import load_config
    from sim.run.job import speedups
    from sim.run.plan import make_plan
    config = load_config(None, [f"method={method}", "data.name=synthetic", f"model.width={width}",
                                f"train.batch_size={batch}"])
    in_effect = speedups(config)  # before the blocks allocate, as in a run
    return make_stage(make_plan(config, 1).build_blocks(range(6), torch.device("cpu")), 0), in_effect


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
    args = parser.parse_args()
    sys.path[0] = str(args.tree.resolve())  # instead of this script's folder: the tree's packages come first
    import torch
    torch.set_num_threads(args.threads)
    import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: an import, not work)

    memory = _peak_memory_class()(torch.device("cpu"))
    memory.start()
    stage, speedups = build_stage(args.method, args.width, args.batch, args.baseline)
    views = torch.randn(2 * args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (2B, 3, 32, 32)
    seconds = []
    for step in range(args.warmup + args.steps):
        began = time.perf_counter()
        stage.forward(views, step)
        seconds.append(time.perf_counter() - began)
    print(json.dumps({"method": args.method, "threads": args.threads, "tree": str(args.tree),
                      "baseline": args.baseline, "warmup_seconds": seconds[:args.warmup],
                      "step_seconds": seconds[args.warmup:], "peak_memory_bytes": memory.peak_bytes(),
                      "speedups": speedups}))


if __name__ == "__main__":
    main()
