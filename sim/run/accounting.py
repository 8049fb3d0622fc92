"""What a run computed, moved and held, per block and per image: summary.json's `accounting` (issue 25),
from the plan's arithmetic and what the ranks measured (their inputs' zeros, their bytes by kind)."""
from __future__ import annotations

from sim.record.summary import RankResult
from sim.run.plan import Plan


def run_accounting(plan: Plan, results: list[RankResult]) -> dict:
    """Per block, per image (two views): dense multiply-accumulates of the forward pass, the update and
    (end to end) the backward pass; the fraction of zeros in the block's input and the synaptic
    operations it implies (the convolution's MACs on non-zero inputs, as event-driven hardware counts
    them); the bytes of state it holds (sim.cost.model.held_memory). Over every rank and the training
    loop (not the gathering of weights after it): bytes sent of each message kind, and per image."""
    batch = plan.config.train.batch_size  # images a step, per replica
    zeros: dict[int, float] = {}
    for result in results:  # replica 0's first: every replica sees the same kind of input
        for block, fraction in result.input_zero_fraction.items():
            zeros.setdefault(block, fraction)
    blocks = {}
    for block, operations in enumerate(plan.block_operations()):
        per_image = {name: value / batch for name, value in operations.items()}
        zero = zeros.get(block)
        blocks[str(block)] = {
            "forward_macs": per_image["forward"], "update_macs": per_image["update"],
            "backward_macs": per_image["backward"], "input_zero_fraction": zero,
            "synaptic_ops": None if zero is None else (1 - zero) * per_image["convolution"],
            "state_bytes": plan.held_memory([block])}
    sent: dict[str, int] = {}
    for result in results:
        for kind, size in result.bytes_by_kind.get("sent", {}).items():
            sent[kind] = sent.get(kind, 0) + size
    images = results[0].steps * batch * plan.replicas
    return {"blocks": blocks, "bytes_sent": sent,
            "bytes_sent_per_image": {k: v / images for k, v in sent.items()} if images else {}}
