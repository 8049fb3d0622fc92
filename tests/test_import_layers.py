"""The import graph points one way: launch -> sim -> layers, and inside sim from the top room down,
run > cost > pipeline > record > data (sim.errors under all of them). analysis reads the formats that
sim.record defines and nothing else of sim. Every import counts, those inside functions and under
TYPE_CHECKING included: an arrow is an arrow.

    python -m tests.test_import_layers    # prints the graph between the rooms, with the import counts
"""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIM_ROOMS = ("sim.run", "sim.cost", "sim.pipeline", "sim.record", "sim.data")  # top to bottom
PACKAGES = ("launch", "analysis", "sim", "layers")
# Which rooms each room may import (besides itself); everything else is an upward or sideways arrow.
ALLOWED = {
    "launch": {"launch", "sim", *SIM_ROOMS, "sim.errors", "layers", "analysis"},
    "analysis": {"analysis", "sim.record", "layers"},
    "layers": {"layers"},
    "sim.errors": set(),
    **{room: {"sim.errors", "layers", *SIM_ROOMS[i + 1:]} for i, room in enumerate(SIM_ROOMS)},
}
DISTRIBUTED = "torch.distributed"
# The pure cost model and the plan are arithmetic on shapes: nothing they import (of laminar's own, at any
# depth) may import torch.distributed, so a plan (launch.show_schedule's too) never loads it on its own.
NO_DISTRIBUTED = ("sim.cost.model", "sim.run.plan", "sim.run.config")


def room_of(module: str) -> str | None:
    """The room a module belongs to: a sim sub-package, sim.errors, or a top-level package."""
    for room in (*SIM_ROOMS, "sim.errors"):
        if module == room or module.startswith(room + "."):
            return room
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[str]:
    """Every module `path` imports by name (absolute imports: the project uses no relative ones)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)  # and each name that may be a module of it (`from sim.cost import measure`)
            found += [f"{node.module}.{alias.name}" for alias in node.names
                      if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").is_file()]
    return found


def project_modules() -> dict[str, list[str]]:
    """Module name -> what it imports, for every module of the four packages."""
    return {module_name(p): imports_of(p) for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def room_edges(modules: dict[str, list[str]]) -> Counter:
    """(from room, to room) -> how many imports make that arrow."""
    edges = Counter()
    for module, imported in modules.items():
        source = room_of(module)
        for target in map(room_of, imported):
            if target is not None and target != source:
                edges[source, target] += 1
    return edges


def test_no_import_climbs_a_room():
    modules = project_modules()
    wrong = [f"{module} imports {target}" for module, imported in modules.items() for target in imported
             if room_of(target) not in (None, room_of(module)) and room_of(target) not in ALLOWED[room_of(module)]]
    assert not wrong, "imports against the rooms' order:\n" + "\n".join(wrong)


def test_every_sim_module_lives_in_a_room():
    loose = [m for m in project_modules() if m.startswith("sim.") and room_of(m) == "sim"]
    assert not loose, f"modules of sim outside its rooms: {loose}"


def test_plan_and_cost_model_never_load_torch_distributed():
    modules = project_modules()
    for start in NO_DISTRIBUTED:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module in seen or module not in modules:
                continue
            seen.add(module)
            assert not any(i == DISTRIBUTED or i.startswith(DISTRIBUTED + ".") for i in modules[module]), \
                f"{start} loads torch.distributed through {module}"
            todo += [i for i in modules[module] if room_of(i) is not None]
        assert len(seen) > 1, f"{start} was not found, or imports nothing of the project"


def test_the_checker_sees_a_climbing_import():
    """The test above would fail on an upward arrow: a data module importing the plan is one."""
    climbing = {"sim.data.feed": ["sim.run.plan"], "sim.run.plan": ["sim.data.feed"]}
    wrong = [m for m, imported in climbing.items() for t in imported if room_of(t) not in ALLOWED[room_of(m)]]
    assert wrong == ["sim.data.feed"]


if __name__ == "__main__":
    edges = room_edges(project_modules())
    order = ["launch", "analysis", *SIM_ROOMS, "sim.errors", "layers"]
    for source in order:
        targets = [f"{t} ({edges[source, t]})" for t in order if edges[source, t]]
        if targets:
            print(f"{source:<13} -> {', '.join(targets)}")
    climbing = [f"{s} -> {t}" for (s, t) in edges if t not in ALLOWED[s]]
    print("upward or sideways arrows:", ", ".join(climbing) or "none")
