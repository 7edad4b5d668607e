"""How scenario results are shown: a line per step as it runs (the runner logs those), a
line per scenario, and a JSON report."""

from __future__ import annotations

import json
from typing import Any

from vmsim.scenario.runner import ScenarioResult


def scenario_line(r: ScenarioResult) -> str:
    steps = [s for s in r.steps if s.ok is not None]
    passed = sum(1 for s in steps if s.ok)
    mark = "PASS" if r.ok else "FAIL"
    line = f"{mark} {r.name} ({passed}/{len(r.steps)} steps, {r.seconds:.1f} s)"
    if r.error:
        line += f": {r.error}"
    return line


def failure_lines(r: ScenarioResult) -> list[str]:
    return [f"  FAIL run: {f}" for f in r.run_failures]


def write_json(path: str, results: list[ScenarioResult]) -> None:
    doc: dict[str, Any] = {"passed": sum(r.ok for r in results),
                           "failed": sum(not r.ok for r in results),
                           "scenarios": [r.as_dict() for r in results]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
