"""How a config key is declared: beside its dataclass field, once, with everything the repo knows of it.

    learning_rate: float = key(1e-3, finite & positive, resume=True)

`key` gives a field its default, the rule its value must meet (config.check_values applies it),
whether a resumed run may change it (`resume`: how long, how fast and where a run trains), and
whether it defines the run (`run`: experiments.py compares those when it reads a run back;
where a run reads and writes and how fast it goes do not). Rules that join several keys are in
config.check_combinations.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Rule:
    """What a value must be: tests, each with the words that say it ("at least 1"), checked in order."""

    checks: tuple[tuple[Callable[[Any], bool], str], ...]

    def broken_by(self, value: Any) -> Optional[str]:
        """The words of the first test value fails, or None."""
        return next((requirement for test, requirement in self.checks if not test(value)), None)

    def __and__(self, other: "Rule") -> "Rule":
        return Rule(self.checks + other.checks)


def rule(test: Callable[[Any], bool], requirement: str) -> Rule:
    return Rule(((test, requirement),))


def at_least(minimum: float) -> Rule:
    return rule(lambda v: v >= minimum, f"at least {minimum}")


def one_of(choices: tuple) -> Rule:
    return rule(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def or_null(of: Rule) -> Rule:
    """of's tests, each passed by null (None) too."""
    return Rule(tuple((lambda v, test=test: v is None or test(v), f"{words}, or null") for test, words in of.checks))


def matches(pattern: str, requirement: str) -> Rule:
    return rule(lambda v: re.fullmatch(pattern, v) is not None, requirement)


def names_from(choices: tuple) -> Rule:
    """A list of distinct names, each one of choices."""
    return rule(lambda v: set(v) <= set(choices) and len(set(v)) == len(v),
                f"a list of distinct names from {', '.join(choices)}")


finite = rule(lambda v: v is None or math.isfinite(v), "a finite number")
positive = rule(lambda v: v > 0, "positive")
probability = rule(lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass(frozen=True)
class Declared:
    """A key's declaration (the field's metadata)."""

    rule: Optional[Rule] = None
    resume: bool = False   # a resumed run may change it
    run: bool = True       # it defines the run: a run read back must have the value asked for


def key(default: Any, rule: Optional[Rule] = None, *, resume: bool = False, run: bool = True) -> Any:
    """A config field with its default (a list is copied for each config), rule and role."""
    declared = {"declared": Declared(rule, resume, run)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=declared)
    return field(default=default, metadata=declared)


def declaration(f) -> Declared:
    """A dataclass field's declaration (a field declared without key(): no rule, defines the run)."""
    return f.metadata.get("declared", Declared())
