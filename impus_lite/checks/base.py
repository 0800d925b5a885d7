"""What every exercise check shares: run the student's code, compare with a number, say which.

A check takes the student's function (or value), computes what it returns on fixed inputs and
compares that with the package's own answer. It prints one line and returns a
:class:`CheckResult`:

    ✓ right: slerp at 5 alphas, largest difference 2.1e-07 (tolerance 1e-05)
    ✗ wrong: slerp at 5 alphas, largest difference 3.2e-01 (tolerance 1e-05): the midpoint ...
    … not written yet: slerp raised NotImplementedError: fill in the cell above

A student's "Run all" never stops at a check: a stub that raises ``NotImplementedError`` or a
wrong answer prints its line and goes on. With ``IMPUS_LITE_STRICT_CHECKS=1`` (what the
notebook test and the site build set, with the hidden solutions run) anything but "right"
raises :class:`CheckFailed`, so a solution that rots fails the tests.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

#: Environment variable: "1" makes every check raise unless the answer is right.
STRICT_ENV = "IMPUS_LITE_STRICT_CHECKS"


class CheckFailed(AssertionError):
    """A check in strict mode whose answer was wrong or not written."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: what was checked ("slerp at 5 alphas").
        status: "right", "wrong" or "not written".
        error: the measured discrepancy (largest absolute difference unless the check says
            otherwise); NaN when nothing could be measured.
        tolerance: the largest ``error`` counted as right.
        hint: one sentence for a wrong or missing answer ("" when right).
    """

    name: str
    status: str
    error: float
    tolerance: float
    hint: str = ""

    def __bool__(self) -> bool:
        return self.status == "right"

    @property
    def line(self) -> str:
        if self.status == "not written":
            return f"… not written yet: {self.name}: {self.hint}"
        mark = "✓ right" if self.status == "right" else "✗ wrong"
        text = f"{mark}: {self.name}, error {self.error:.2e} (tolerance {self.tolerance:.0e})"
        return text if self.status == "right" or not self.hint else f"{text}: {self.hint}"


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


def report(result: CheckResult) -> CheckResult:
    """Print ``result``'s line; in strict mode raise :class:`CheckFailed` unless it is right."""
    print(result.line)
    if strict() and not result:
        raise CheckFailed(result.line)
    return result


def as_array(value: Any) -> np.ndarray:
    """``value`` (tensor, array, number or nested list) as a float64 numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def largest_difference(got: Any, expected: Any) -> float:
    """max |got - expected| (inf when the shapes differ or a value is not finite)."""
    got, expected = as_array(got), as_array(expected)
    if got.shape != expected.shape:
        return math.inf
    if got.size == 0:
        return 0.0
    difference = np.abs(got - expected)
    return float(difference.max()) if np.all(np.isfinite(difference)) else math.inf


def compare(name: str, compute: Callable[[], Any], expected: Any, tolerance: float,
            hint: str = "", relative_to: Optional[float] = None) -> CheckResult:
    """Call ``compute()`` (which runs the student's code) and compare with ``expected``.

    ``error`` is the largest absolute difference, divided by ``relative_to`` when given.
    ``NotImplementedError`` from the student's code gives "not written"; any other exception a
    "wrong" whose hint names it. Shapes that differ are wrong, with both shapes in the hint.
    """
    try:
        got = compute()
    except NotImplementedError as stub:
        why = str(stub) or "it raised NotImplementedError"
        return report(CheckResult(name, "not written", math.nan, tolerance,
                                  f"{why}; fill in the cell above (or open its solution)"))
    except Exception as error:  # the student's code crashed: say how, do not stop the notebook
        return report(CheckResult(name, "wrong", math.nan, tolerance,
                                  f"your code raised {type(error).__name__}: {error}"))
    got_shape, expected_shape = as_array(got).shape, as_array(expected).shape
    if got_shape != expected_shape:
        return report(CheckResult(name, "wrong", math.inf, tolerance,
                                  f"shape {got_shape}, expected {expected_shape}"))
    error = largest_difference(got, expected)
    if relative_to:
        error /= relative_to
    status = "right" if error <= tolerance else "wrong"
    return report(CheckResult(name, status, error, tolerance, "" if status == "right" else hint))


def check_value(name: str, value: Any, expected: Any, tolerance: float, hint: str = "") -> CheckResult:
    """A number (or array) the student computed, e.g. by pen and paper, against ``expected``.

    ``value = ...`` left as ``...`` (Ellipsis) or ``None`` counts as not written.
    """
    if value is Ellipsis or value is None:
        return report(CheckResult(name, "not written", math.nan, tolerance,
                                  "replace the ... with your answer"))
    return compare(name, lambda: value, expected, tolerance, hint)
