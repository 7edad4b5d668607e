"""The scenario file: a topology (inline or by path), steps run in order (each optionally at a
time), and expectations on each step's result and on the run's summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vmsim.launcher.topology import Topology, TopologyError, load_topology, load_topology_file

STEP_KINDS = ("until", "sleep", "host", "guest", "kill", "check")


class ScenarioError(Exception):
    """A mistake in a scenario file: one readable line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KillSpec(Strict):
    target: str = Field(description="host, or a VM name (its guest process)")
    signal: Literal["SIGKILL", "SIGTERM", "SIGSTOP", "SIGCONT"] = "SIGKILL"
    # kill at a random moment in [lo, hi] seconds from this step, instead of at once
    at_random: tuple[float, float] | None = None


class Step(Strict):
    name: str | None = None
    at: float | None = Field(None, ge=0, description="not before this many seconds from start")
    # exactly one of these
    until: str | None = None           # a condition to wait for
    check: str | None = None           # a condition that must hold now
    sleep: float | None = Field(None, ge=0)
    host: dict[str, Any] | None = None     # {op, vm, device, ...}
    guest: dict[str, Any] | None = None    # {vm, op, ...}
    kill: KillSpec | str | None = None
    timeout: float = Field(10.0, gt=0)     # for until and for ops
    # on the step's result (an op's reply): dotted path -> expected value / "OP value"
    expect: dict[str, Any] = Field(default_factory=dict)
    fails: bool = False                    # the op must be refused
    error: str | None = None               # ... with a reason matching this regex

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        kinds = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a step has exactly one of {', '.join(STEP_KINDS)} "
                             f"(got {', '.join(kinds) or 'none'})")
        for key in ("host", "guest"):
            d = getattr(self, key)
            if d is not None and "op" not in d:
                raise ValueError(f"{key}: an 'op' key is required")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)


class Scenario(Strict):
    name: str
    description: str | None = None
    topology: str | dict[str, Any]
    seed: int = 1
    timeout: float = Field(120.0, gt=0, description="the whole scenario")
    steps: list[Step] = Field(min_length=1)
    run_after: float = Field(0.0, ge=0, description="seconds the run goes on after the steps")
    expect: dict[str, Any] = Field(default_factory=dict)   # on the run's summary


class LoadedScenario:
    def __init__(self, scenario: Scenario, topology: Topology, path: Path) -> None:
        self.scenario = scenario
        self.topology = topology
        self.path = path

    @property
    def config_dir(self) -> Path:
        t = self.scenario.topology
        if isinstance(t, str):
            return (self.path.parent / t).resolve().parent
        return self.path.parent.resolve()


def load_scenario(path: str | Path) -> LoadedScenario:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except (OSError, yaml.YAMLError) as e:
        raise ScenarioError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: expected a mapping with name, topology and steps")
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        raise ScenarioError(f"{path}: {where}: {msg}") from None
    try:
        if isinstance(sc.topology, str):
            topo = load_topology_file(p.parent / sc.topology)
        else:
            topo = load_topology(sc.topology, f"{path}: topology")
    except TopologyError as e:
        raise ScenarioError(str(e)) from None
    return LoadedScenario(sc, topo, p)
