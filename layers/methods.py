"""The registry of learning methods: one config name -> what each block learns from.

A method is data, not a code path: which blocks carry a loss, how activity is pooled before it,
where the context comes from and what maps context to a prediction.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    end_to_end: bool  # True: one loss at the top block, gradient back-propagated through all blocks
    pooling: str  # "global" (spatial mean) or "grid" (2D pooling to the paper's grid)
    contexts: tuple[str, ...]  # "lateral" (same block, other view) and/or "top" (top block, other view)
    predictor: str  # "bilinear" (trainable B), "identity" (B = I, fixed) or "infonce" (projection)

    @property
    def uses_top_context(self) -> bool:
        return "top" in self.contexts


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("clapp", "CLAPP: hinge loss per block, global pooling, lateral context",
               False, "global", ("lateral",), "bilinear"),
        Method("clapp_pp", "CLAPP++: CLAPP with 2D spatial pooling",
               False, "grid", ("lateral",), "bilinear"),
        Method("clapp_pp_dfb", "CLAPP++DFB: context from the top block (direct top-down feedback)",
               False, "grid", ("top",), "bilinear"),
        Method("clapp_pp_both", "CLAPP++both: lateral and top-block context, two B per block, losses summed",
               False, "grid", ("lateral", "top"), "bilinear"),
        Method("bp_clapp_pp", "BP-CLAPP++ (CPC-like BP-SSL): one hinge loss on the last block's mean, end to end",
               True, "global", ("lateral",), "bilinear"),
        Method("bp_infonce", "BP-InfoNCE (SimCLR-like BP-SSL): projection, cosine / temperature, end to end",
               True, "global", ("lateral",), "infonce"),
        Method("ff", "Forward-Forward-like: B fixed to the identity, the score is z . c",
               False, "grid", ("lateral",), "identity"),
        Method("infonce_local", "Layer-wise InfoNCE (Greedy InfoMax style): a projection and InfoNCE per block",
               False, "grid", ("lateral",), "infonce"),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
