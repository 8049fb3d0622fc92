"""Where a training step's time goes, kernel by kernel, against this machine's best FLOP rate.

    python -m launch.bench.kernels [--method bp_infonce] [--width 1.0] [--threads 1] [--steps 2] [--out DIR]

One process trains all six blocks of METHOD on synthetic views (32 px, batch 32: launch/bench/step_timer.py's
stage); after two warm-up steps, --steps steps run under torch.profiler (shapes recorded). Each kernel
call is grouped by operator and input shapes, so every convolution shows per block: its self time per
step, its share of the step, its FLOPs (the profiler's count for matrix products; for oneDNN's
convolutions, forward and backward, from the shapes: 2 N C_out H W C_in k^2 per product, the input's
gradient only end to end and not into the image, the weight's not where layers.encoder computes it as a
patch product for a small map; wrappers such as aten::conv2d and element-wise kernels count none) and
the GFLOP/s it reached against the machine's best (sim.cost.measure.measure_peak_rates, same threads).
Kernels without FLOPs (copies, im2col, pooling, element-wise, the optimiser) are memory traffic: their
time is what a FLOP floor does not count. Beside the profile, each convolution shape is timed as oneDNN
runs it and as matrix products on unfolded patches (im2col), whose matrix products reach this machine's
best rate: whether another kernel would do better. Writes kernels.json and kernels.md into DIR.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from launch.machine import code_version, describe_machine, write_figures
from launch.program import ProgramErrors, run_program
from launch.runner import positive
from layers.encoder import PATCH_GRADIENT_MAX_PIXELS
from sim.cost.measure import measure_peak_rates

TIMER = Path(__file__).with_name("step_timer.py")
BATCH = 32
IMAGE_CHANNELS = 3


def _stage(method: str, width: float, batch: int):
    """step_timer.py's stage of all six blocks and its input shape (loaded from its file: it is a script)."""
    spec = importlib.util.spec_from_file_location("laminar_step_timer", TIMER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stage, _, shape = module.build_stage(method, width, batch, False, ["data.name=synthetic"], list(range(6)))
    return stage, shape


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")  # the profiler counts their FLOPs (not its wrappers')


def convolution_flops(name: str, shapes: Sequence[Sequence[int]], end_to_end: bool) -> float:
    """FLOPs of a oneDNN convolution call from its input shapes (stride 1, same padding, as the encoder's);
    `end_to_end`: the inputs of the blocks above the first take a gradient (a local block's input is detached)."""
    if name == "aten::mkldnn_convolution":
        (n, c_in, h, w), (c_out, _, kh, kw) = shapes[0], shapes[1]
        return 2.0 * n * c_out * h * w * c_in * kh * kw
    if name == "aten::convolution_backward":
        (n, c_out, h, w), inputs, (_, c_in, kh, kw) = shapes[0], shapes[1], shapes[2]
        # the weight's gradient, unless a patch product (im2col and mm, counted there) computes it for a small map;
        # the input's, end to end, unless the input is the image
        products = (h * w > PATCH_GRADIENT_MAX_PIXELS) + (end_to_end and inputs[1] != IMAGE_CHANNELS)
        return products * 2.0 * n * c_out * h * w * c_in * kh * kw
    return 0.0


def profile_steps(method: str, width: float, threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    stage, shape = _stage(method, width, BATCH)
    end_to_end = stage.blocks[0].rule.end_to_end
    views = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for step in range(2):  # warm-up: AdamW's state, oneDNN's primitives
        stage.forward(views, step)
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as profiler:
        for step in range(2, 2 + steps):
            stage.forward(views, step)
    step_seconds = (time.perf_counter() - began) / steps
    kernels = []
    for event in profiler.key_averages(group_by_input_shape=True):
        shapes = [list(s) for s in event.input_shapes]
        flops = event.flops if event.key in MATRIX_PRODUCTS else convolution_flops(event.key, shapes, end_to_end)
        seconds = event.self_cpu_time_total / 1e6 / steps
        if seconds > 0:
            kernels.append({"name": event.key, "shapes": [s for s in shapes if s], "calls": event.count // steps,
                            "seconds": seconds, "gflop": flops / steps / 1e9})
    kernels.sort(key=lambda k: -k["seconds"])
    return {"step_seconds": step_seconds, "kernels": kernels}


def _best_seconds(run, repeats: int = 3) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return best


def gemm_alternative(result: dict) -> list[dict]:
    """For each convolution shape of the profile, oneDNN against the same convolution as matrix products
    on unfolded patches (im2col, as layers.encoder does for small maps' weight gradients): forward, weight
    gradient, input gradient, seconds each, so a profile says whether another kernel would be faster."""
    found = []
    for kernel in result["kernels"]:
        if kernel["name"] != "aten::mkldnn_convolution":
            continue
        (n, c_in, h, w), (c_out, _, k, _) = kernel["shapes"][:2]
        x, weight = torch.randn(n, c_in, h, w), torch.randn(c_out, c_in, k, k)
        grad = torch.randn(n, c_out, h, w)
        matrix = weight.view(c_out, -1)  # (C_out, C_in k^2)

        def patches() -> torch.Tensor:
            return F.unfold(x, k, padding=k // 2)  # (N, C_in k^2, H W)

        timings = {
            "forward": (lambda: F.conv2d(x, weight, padding=k // 2), lambda: matrix @ patches()),
            "weight_gradient": (lambda: torch.nn.grad.conv2d_weight(x, weight.shape, grad, padding=k // 2),
                                lambda: grad.flatten(2).transpose(1, 2).reshape(-1, c_out).t()
                                @ patches().transpose(1, 2).reshape(-1, c_in * k * k)),
            "input_gradient": (lambda: torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=k // 2),
                               lambda: F.fold(matrix.t() @ grad.flatten(2), (h, w), k, padding=k // 2)),
        }
        seconds = {name: {"onednn": _best_seconds(a), "gemm": _best_seconds(b)} for name, (a, b) in timings.items()}
        found.append({"shapes": kernel["shapes"][:2], "gflop": 2e-9 * n * c_out * h * w * c_in * k * k, **seconds})
    return found


def markdown(result: dict, rows: int = 25) -> str:
    peak, step = result["peak_flop_per_s"], result["step_seconds"]
    profiled = sum(k["seconds"] for k in result["kernels"])
    with_flops = [k for k in result["kernels"] if k["gflop"] > 0]
    flop_seconds = sum(k["seconds"] for k in with_flops)
    lines = [f"{result['method']}, width {result['width']}, batch {BATCH}, 32 px, {result['threads']} thread(s); "
             f"{result['machine']['cpu']}, torch {result['machine']['torch']}, {result['date']}", "",
             f"- a step: {step:.3f} s (profiled kernels' self time {profiled:.3f} s); the machine's best: "
             f"{peak / 1e9:.1f} GFLOP/s",
             f"- kernels with FLOPs: {flop_seconds:.3f} s ({flop_seconds / step:.0%} of the step) for "
             f"{sum(k['gflop'] for k in with_flops):.1f} GFLOP; the rest ({(step - flop_seconds) / step:.0%}): "
             "memory traffic and the interpreter", "",
             "| kernel | input shapes | calls | s/step | share | GFLOP | GFLOP/s | of best |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k in result["kernels"][:rows]:
        rate = k["gflop"] / k["seconds"] if k["gflop"] else math.nan
        rate_text = f"{rate:.1f} | {rate * 1e9 / peak:.2f}" if k["gflop"] else "- | -"
        lines.append(f"| {k['name']} | {k['shapes'][:3]} | {k['calls']} | {k['seconds']:.4f} | "
                     f"{k['seconds'] / step:.1%} | {k['gflop']:.2f} | {rate_text} |")
    if result.get("gemm"):
        lines += ["", "Each convolution as oneDNN runs it against matrix products on unfolded patches (s, best of 3):",
                  "", "| input, weight | GFLOP | forward: oneDNN / GEMM | weight gradient | input gradient |",
                  "|---|---:|---:|---:|---:|"]
        for g in result["gemm"]:
            cells = [f"{g[n]['onednn']:.3f} / {g[n]['gemm']:.3f}" for n in ("forward", "weight_gradient",
                                                                               "input_gradient")]
            lines.append(f"| {g['shapes']} | {g['gflop']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="bp_infonce")
    parser.add_argument("--width", type=float, default=1.0, help="model.width (default 1.0, the paper's)")
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--steps", type=positive, default=2, help="profiled steps, after two warm-up ones")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"kernels_{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    with ProgramErrors(0) as errors:
        torch.set_num_threads(args.threads)
        peak, _ = measure_peak_rates()
        result = {"method": args.method, "width": args.width, "threads": args.threads, "steps": args.steps,
                  "machine": describe_machine(), "code_version": code_version(), "date": time.strftime("%Y-%m-%d"),
                  "peak_flop_per_s": peak, **profile_steps(args.method, args.width, args.threads, args.steps)}
        result["gemm"] = gemm_alternative(result)
        write_figures(args.out, "kernels", result, markdown(result))
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
