"""Runs one scenario: launches its topology as `vmsim run` does, then, instead of simply
waiting out a duration, plays the steps in order against the live run (conditions on the stats
region, ops on the host's and the guests' channels, signals to the processes) and checks what
follows. The run is stopped and cleaned up as any run is; then the summary's expectations are
checked."""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from vmsim.launcher.run import LaunchError, Run
from vmsim.scenario import conditions as C
from vmsim.scenario.counters import CounterError, resolve
from vmsim.scenario.model import LoadedScenario, Step


@dataclass
class StepResult:
    index: int
    name: str
    kind: str
    ok: bool | None            # None: not run (an earlier step failed)
    detail: str = ""
    seconds: float = 0.0
    reply: Any = None


@dataclass
class ScenarioResult:
    name: str
    path: str
    ok: bool
    steps: list[StepResult] = field(default_factory=list)
    run_failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    summary: dict[str, Any] | None = None
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "ok": self.ok,
                "seconds": round(self.seconds, 3), "error": self.error,
                "steps": [{"index": s.index, "name": s.name, "kind": s.kind,
                           "ok": s.ok, "detail": s.detail,
                           "seconds": round(s.seconds, 3)} for s in self.steps],
                "run_failures": self.run_failures,
                "outcome": (self.summary or {}).get("outcome"),
                "problems": (self.summary or {}).get("problems", [])}


class StepFailed(Exception):
    pass


def describe_step(step: Step) -> str:
    if step.name:
        return step.name
    k = step.kind
    if k in ("until", "check"):
        return f"{k} {getattr(step, k)}"
    if k == "sleep":
        return f"sleep {step.sleep} s"
    if k == "kill":
        kill = step.kill
        return f"kill {kill if isinstance(kill, str) else kill.target}"
    d = getattr(step, k)
    where = ".".join(str(d[x]) for x in ("vm", "device") if x in d)
    return f"{k} {d['op']} {where}".strip()


class Director:
    """Plays the steps against a started run (called by Run in place of its watch loop)."""

    def __init__(self, loaded: LoadedScenario, log: Any) -> None:
        self.sc = loaded.scenario
        self.rng = random.Random(self.sc.seed)
        self.results: list[StepResult] = []
        self.log = log

    def __call__(self, run: Run) -> None:
        start = run.started_at
        deadline = start + self.sc.timeout
        failed = False
        for i, step in enumerate(self.sc.steps, 1):
            name = describe_step(step)
            if failed:
                self.results.append(StepResult(i, name, step.kind, None, "not run"))
                continue
            t0 = time.monotonic()
            res = StepResult(i, name, step.kind, True)
            try:
                if time.monotonic() > deadline:
                    raise StepFailed(f"the scenario's timeout ({self.sc.timeout} s) passed")
                if step.at is not None:
                    self._wait_until_time(run, start + step.at)
                res.detail, res.reply = self._do(run, step, deadline)
            except StepFailed as e:
                res.ok, res.detail = False, str(e)
                failed = True
            res.seconds = time.monotonic() - t0
            self.results.append(res)
            mark = "PASS" if res.ok else "FAIL"
            self.log(f"  {mark} step {i}: {name}" + (f": {res.detail}" if res.detail else ""))
        if self.sc.run_after and not failed:
            self._wait_until_time(run, time.monotonic() + self.sc.run_after)

    # ---- steps -----------------------------------------------------------------------------------
    def _do(self, run: Run, step: Step, deadline: float) -> tuple[str, Any]:
        k = step.kind
        if k == "sleep":
            self._wait_until_time(run, time.monotonic() + step.sleep)
            return "", None
        if k in ("until", "check"):
            return self._condition(run, getattr(step, k), step.timeout if k == "until" else 0,
                                   deadline), None
        if k == "kill":
            return self._kill(run, step), None
        return self._op(run, step)

    def _condition(self, run: Run, text: str, timeout: float, deadline: float) -> str:
        try:
            parts = C.parse_condition(text)
        except C.ConditionError as e:
            raise StepFailed(str(e)) from None
        end = min(time.monotonic() + timeout, deadline)

        def res(path: str) -> int:
            try:
                return resolve(run, path)
            except CounterError as e:
                raise StepFailed(str(e)) from None

        while True:
            ok, seen = C.holds(parts, res)
            if ok:
                return seen
            if time.monotonic() >= end:
                why = f"not within {timeout:g} s" if timeout else "does not hold"
                raise StepFailed(f"{why} ({seen})")
            run.pump(0.02)

    def _kill(self, run: Run, step: Step) -> str:
        kill = step.kill
        target, sig, window = ((kill, "SIGKILL", None) if isinstance(kill, str)
                               else (kill.target, kill.signal, kill.at_random))
        delay = 0.0
        if window is not None:
            delay = self.rng.uniform(*window)
            self._wait_until_time(run, time.monotonic() + delay)
        try:
            pid = run.signal_child(target, getattr(signal, sig))
        except LaunchError as e:
            raise StepFailed(str(e)) from None
        return f"{sig} to {target} (pid {pid})" + (f" after {delay:.2f} s" if window else "")

    def _op(self, run: Run, step: Step) -> tuple[str, Any]:
        side = step.kind
        args = dict(getattr(step, side))
        op = args.pop("op")
        if side == "guest":
            target = args.pop("vm", None)
            if target is None:
                raise StepFailed("guest: a 'vm' key is required")
            if op == "net_send" and "." in str(args.get("to", "")):
                args["to"] = self._mac_of(run, str(args["to"]), step.timeout)
        else:
            target = "host"
        try:
            ok, reply = run.request(target, op, args, step.timeout)
        except LaunchError as e:
            raise StepFailed(str(e)) from None
        if step.fails:
            if ok:
                raise StepFailed(f"expected the {side} to refuse {op}, it answered {reply!r}")
            if step.error and not C.matches(reply, f"~ {step.error}"):
                raise StepFailed(f"refused, but for another reason: {reply}")
            return f"refused: {reply}", reply
        if not ok:
            raise StepFailed(f"{side} refused {op}: {reply}")
        fails = C.check_expectations(reply, step.expect)
        if fails:
            raise StepFailed("; ".join(fails))
        return _brief(reply), reply

    def _mac_of(self, run: Run, name: str, timeout: float) -> str:
        vm, _, dev = name.partition(".")
        try:
            ok, reply = run.request(vm, "query", {}, timeout)
        except LaunchError as e:
            raise StepFailed(str(e)) from None
        mac = reply.get("devices", {}).get(dev, {}).get("mac") if ok else None
        if not mac:
            raise StepFailed(f"no MAC for {name}")
        return mac

    def _wait_until_time(self, run: Run, t: float) -> None:
        while (left := t - time.monotonic()) > 0:
            run.pump(min(left, 0.1))


def _brief(reply: Any) -> str:
    if isinstance(reply, dict) and len(str(reply)) <= 120:
        return ", ".join(f"{k} {v}" for k, v in reply.items())
    return ""


def run_scenario(loaded: LoadedScenario, log: Any) -> ScenarioResult:
    sc = loaded.scenario
    director = Director(loaded, log)
    t0 = time.monotonic()
    res = ScenarioResult(sc.name, str(loaded.path), False)
    try:
        run = Run(loaded.topology, str(loaded.path), loaded.config_dir,
                  duration=sc.timeout, progress=False, log=log, director=director)
        result = run.execute()
    except LaunchError as e:
        res.error = str(e)
        res.steps = director.results
        res.seconds = time.monotonic() - t0
        return res
    res.seconds = time.monotonic() - t0
    res.steps = director.results
    res.summary = result.summary
    if len(director.results) < len(sc.steps):
        # the run ended (a failure at start-up) before every step was played
        res.error = "; ".join(result.summary.get("problems", [])) or "the run ended early"
        for i in range(len(director.results) + 1, len(sc.steps) + 1):
            res.steps.append(StepResult(i, describe_step(sc.steps[i - 1]),
                                        sc.steps[i - 1].kind, None, "not run"))
    res.run_failures = C.check_expectations(result.summary, _run_expect(sc.expect))
    res.ok = (not res.error and all(s.ok for s in res.steps) and not res.run_failures)
    return res


def _run_expect(expect: dict[str, Any]) -> dict[str, Any]:
    """By default a scenario's run must end cleanly; a scenario that kills or corrupts says
    what it expects instead."""
    out = {"outcome": "ok"} if "outcome" not in expect and "exit_code" not in expect else {}
    out.update(expect)
    return out
