"""The benches' printed results, as the bench tests read them: numbers, their rounding, and each
`target ...: PASS|MISS` line checked against its own limit (tests import these with `from bench_output
import ...`)."""

import math
import re
from dataclasses import dataclass

NUM = r"\d+(?:\.\d+)?"
TARGET_LINE = re.compile(
    rf"^target (?P<what>.+?) (?P<op><=|>=) (?P<target>{NUM})(?P<unit>x|%)(?P<rest>.*): "
    rf"(?P<verdict>PASS|MISS)$",
    re.M,
)


def number(text: str) -> float:
    """A printed number, which must be finite and positive."""
    value = float(text)
    assert math.isfinite(value) and value > 0, f"not a finite positive number: {text!r}"
    return value


def rounding(text: str) -> float:
    """Half a unit in the last printed digit of `text`: how far the printed number may be from the true
    one."""
    return 0.5 * 10.0 ** -(len(text.split(".")[1]) if "." in text else 0)


@dataclass
class Target:
    """One `target WHAT <=|>= LIMIT: ...MEASURED...: PASS|MISS` line of a bench."""

    what: str
    op: str
    limit: float
    unit: str
    measured: float
    measured_text: str  # as printed, for comparing with the bench's other lines
    verdict: str
    line: str


def bench_targets(stdout: str) -> list:
    """Every target line of a bench's output, each checked: its measured value (`(measured V)` or a
    trailing `: V`) parses into a finite positive number in the limit's unit, and the verdict agrees
    with it and the stated limit (either verdict only where the printed value rounds to the limit)."""
    targets = []
    for m in TARGET_LINE.finditer(stdout):
        line, rest = m.group(0), m.group("rest")
        got = re.search(rf"\(measured ({NUM})(x|%)", rest) or re.search(rf": ({NUM})(x|%)$", rest)
        assert got, f"no measured value in {line!r}"
        assert got.group(2) == m.group("unit"), f"measured and limit in different units: {line!r}"
        t = Target(
            m.group("what"),
            m.group("op"),
            number(m.group("target")),
            m.group("unit"),
            number(got.group(1)),
            got.group(1),
            m.group("verdict"),
            line,
        )
        met = t.measured <= t.limit if t.op == "<=" else t.measured >= t.limit
        if abs(t.measured - t.limit) > rounding(t.measured_text):
            assert (t.verdict == "PASS") == met, (
                f"verdict {t.verdict} contradicts {t.measured_text} {t.op} {t.limit}: {line!r}"
            )
        targets.append(t)
    return targets


def within_rounding(value_text: str, low: float, high: float) -> bool:
    """The printed `value_text` is consistent with a true value in [low, high]."""
    value, slack = float(value_text), rounding(value_text)
    return low - slack <= value <= high + slack


def ratio_bounds(num_text: str, den_text: str) -> tuple:
    """(low, high) of num/den for two printed, rounded positive numbers."""
    num, den = number(num_text), number(den_text)
    dn, dd = rounding(num_text), rounding(den_text)
    return (num - dn) / (den + dd), (num + dn) / max(den - dd, 1e-12)
