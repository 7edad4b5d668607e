"""Conditions and expectations.

A condition is `PATH OP NUMBER`, several joined by `and`: `vm0.vda.q0.used >= 1000`. Paths
name live counters (see vmsim.scenario.counters). An expectation compares a value from a
reply or the summary with what the scenario wants: a literal (equal), or a string starting
with an operator: ">= 3", "!= 0", "~ regex" (matches), "has X" (a list holds X or a string
contains it), "not has X"."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt}
_COND = re.compile(r"^\s*([\w.\-]+)\s*(>=|<=|==|!=|>|<)\s*(-?[\d.]+|\w+)\s*$")


class ConditionError(Exception):
    pass


def parse_condition(text: str) -> list[tuple[str, str, Any]]:
    """'a.b >= 3 and c == 0' -> [(path, op, value), ...]; ConditionError if malformed."""
    parts = []
    for clause in re.split(r"\s+and\s+", text.strip()):
        m = _COND.match(clause)
        if not m:
            raise ConditionError(f"condition {clause!r}: expected PATH OP VALUE "
                                 f"(OP one of {' '.join(OPS)})")
        path, op, raw = m.groups()
        parts.append((path, op, _number(raw)))
    return parts


def _number(raw: str) -> Any:
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            return raw


def holds(parts: list[tuple[str, str, Any]], resolve: Callable[[str], Any]) -> tuple[bool, str]:
    """Whether every clause holds now; and a description of the values seen."""
    seen = []
    ok = True
    for path, op, want in parts:
        got = resolve(path)
        seen.append(f"{path} = {got}")
        try:
            if not OPS[op](got, want):
                ok = False
        except TypeError:
            ok = False
    return ok, ", ".join(seen)


def lookup(data: Any, path: str) -> Any:
    """data['a']['b'][2] for 'a.b.2'; KeyError naming the missing part."""
    cur = data
    parts = path.split(".")
    while parts:
        part = parts.pop(0)
        if isinstance(cur, dict):
            # keys may hold dots themselves ("vm0.verify"): the longest that matches
            for n in range(len(parts), 0, -1):
                joined = ".".join([part, *parts[:n]])
                if joined in cur:
                    part, parts = joined, parts[n:]
                    break
            if part in cur:
                cur = cur[part]
            elif part.isdigit() and int(part) in cur:
                cur = cur[int(part)]
            else:
                raise KeyError(f"{path}: no {part!r} (have: {', '.join(map(str, cur)) or '-'})")
        elif isinstance(cur, list) and part.lstrip("-").isdigit():
            try:
                cur = cur[int(part)]
            except IndexError:
                raise KeyError(f"{path}: index {part} out of range") from None
        else:
            raise KeyError(f"{path}: {part!r} below a {type(cur).__name__}")
    return cur


def matches(got: Any, want: Any) -> bool:
    if isinstance(want, str):
        w = want.strip()
        for op in (">=", "<=", "==", "!=", ">", "<"):
            if w.startswith(op + " "):
                val = _number(w[len(op):].strip())
                try:
                    return OPS[op](got, val)
                except TypeError:
                    return False
        if w.startswith("~ "):
            return re.search(w[2:], str(got)) is not None
        if w.startswith("not has "):
            return not _has(got, w[8:])
        if w.startswith("has "):
            return _has(got, w[4:])
    if isinstance(want, list) and isinstance(got, list | tuple):
        return list(got) == want
    return got == want


def _has(got: Any, item: str) -> bool:
    if isinstance(got, dict):
        return item in got or any(str(k) == item for k in got)
    if isinstance(got, list | tuple):
        return any(str(x) == item for x in got)
    return item in str(got)


def check_expectations(data: Any, expect: dict[str, Any]) -> list[str]:
    """Failures (empty when all hold). A key `problems` with a list of regexes needs each
    to match some problem line."""
    fails = []
    for path, want in expect.items():
        if path == "problems" and isinstance(want, list) and isinstance(data, dict):
            probs = data.get("problems", [])
            for rx in want:
                if not any(re.search(rx, p) for p in probs):
                    fails.append(f"no problem matches {rx!r} (problems: {probs})")
            continue
        try:
            got = lookup(data, path)
        except KeyError as e:
            fails.append(str(e.args[0]))
            continue
        if not matches(got, want):
            fails.append(f"{path} = {got!r}, expected {want!r}")
    return fails
