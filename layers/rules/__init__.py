"""The registry of learning rules: one config name (`method`) -> the rule object that says what each
block learns from (layers.rules.rule). Every module of this package that defines `RULES` adds its
rules here, so a new rule is one file (and its test)."""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from layers.rules.rule import Rule


def discover(package: str = __name__, paths: Sequence[str] = tuple(__path__)) -> dict[str, Rule]:
    """Every rule that a module of `package` (found on `paths`) lists in its `RULES`, by name: the
    paper's family (predictive.py) first, then the other modules in alphabetical order."""
    found: dict[str, Rule] = {}
    for module in sorted(pkgutil.iter_modules(paths), key=lambda m: (m.name != "predictive", m.name)):
        for rule in getattr(importlib.import_module(f"{package}.{module.name}"), "RULES", ()):
            if rule.name in found:
                raise RuntimeError(f"two rules are named {rule.name!r} ({package}.{module.name} and another)")
            found[rule.name] = rule
    return found


# Local rules first, then the end-to-end baselines; within each, in the order their modules list them.
RULES: dict[str, Rule] = dict(sorted(discover().items(), key=lambda item: item[1].end_to_end))


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(RULES)}") from None
