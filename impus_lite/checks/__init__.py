"""Checks for the exercises the student writes: their function in, right or wrong with a number.

    from impus_lite import checks
    checks.check_slerp(my_slerp)   # prints "✓ right: ..." or "✗ wrong: ..." with the error

One module per topic; every check follows :mod:`impus_lite.checks.base` (prints one line,
returns a :class:`CheckResult`, raises only with ``IMPUS_LITE_STRICT_CHECKS=1``).
"""

from .base import STRICT_ENV, CheckFailed, CheckResult, check_value  # noqa: F401
from .barycenters import *  # noqa: F401,F403
from .diffusion import *  # noqa: F401,F403
from .latents import *  # noqa: F401,F403
from .adapters import *  # noqa: F401,F403
from .schedules import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
