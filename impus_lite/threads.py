"""CPU threads for the machine this process actually has, and threads that yield when they wait.

A shared server (JupyterHub, a lab machine, Binder) runs several students' kernels at once.
Two things decide whether their morphs share the CPU or stall each other:

* **How many threads.** PyTorch starts one intra-op thread per core it sees, and it sees the
  host's cores, not a container's share of them. :func:`choose_threads` takes the smallest of
  the CPU affinity mask (``os.sched_getaffinity``) and the cgroup CPU quota (cgroup v2
  ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded up), unless
  ``IMPUS_LITE_THREADS`` (or ``OMP_NUM_THREADS``) says otherwise. A small UNet (below
  :data:`SMALL_UNET_PARAMETERS`, the classroom and tiny models) gets one thread: its layers are
  too small to split, and with waiting threads asleep the hand-offs cost more than a second
  core gives (the README morph on a 2-core AMD EPYC: 21.3 s of stages on one thread, 33.0 s on
  two; ``bench --concurrent``, the results page's "A class on one machine").
* **How threads wait.** OpenMP threads that find no work spin for a while before sleeping
  (``OMP_WAIT_POLICY=ACTIVE``-like defaults). With two processes on two cores, each one's
  spinning threads hold the cores the other needs, and both slow down many times over.
  ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep. OpenMP reads it once, when the
  runtime starts (when torch is first imported), so :func:`prepare_environment` sets it from
  ``impus_lite/__init__.py``, before impus_lite imports torch, unless the environment already
  sets it or torch was imported first (then :func:`thread_report` says what to set).

This module does not import torch at import time.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

#: The environment variable that overrides the thread count.
THREADS_VARIABLE = "IMPUS_LITE_THREADS"
#: UNets with fewer parameters than this run on one CPU thread unless a variable says otherwise.
SMALL_UNET_PARAMETERS = 100_000_000
#: What :func:`prepare_environment` found or did, for :func:`thread_report`.
_WAIT_POLICY_STATE = {"set_by": None}
#: The last choice :func:`apply_threads` made.
_APPLIED: dict = {"choice": None}


def prepare_environment() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` if nothing set it and torch is not loaded yet.

    Returns who set the policy now in effect: "impus_lite", "environment" (the user's value is
    kept), or "too late" (torch was imported before impus_lite: OpenMP has started with its
    default)."""
    if _WAIT_POLICY_STATE["set_by"] is not None:
        return _WAIT_POLICY_STATE["set_by"]
    if "OMP_WAIT_POLICY" in os.environ:
        state = "environment"
    elif "torch" in sys.modules:
        state = "too late"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        state = "impus_lite"
    _WAIT_POLICY_STATE["set_by"] = state
    return state


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """The cgroup CPU quota in cores (quota / period), or None where there is no limit.

    Reads cgroup v2's ``cpu.max`` ("200000 100000" = 2 cores; "max 100000" = no limit), else
    cgroup v1's ``cpu/cpu.cfs_quota_us`` and ``cpu/cpu.cfs_period_us`` (quota -1 = no limit).
    """
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


@dataclass(frozen=True)
class ThreadChoice:
    """How many CPU threads torch gets and why.

    Attributes:
        threads: torch's intra-op threads.
        source: "IMPUS_LITE_THREADS", "OMP_NUM_THREADS", "small model", "cgroup quota" or
            "CPU affinity".
        affinity: CPUs in the affinity mask; quota: the cgroup quota in cores (None: none).
        small_model: the UNet has fewer than :data:`SMALL_UNET_PARAMETERS` parameters.
    """

    threads: int
    source: str
    affinity: int
    quota: Optional[float]
    small_model: bool = False


def _positive_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        from .errors import InputError
        raise InputError(f"{name} must be a whole number of threads >= 1, got {value!r}.")
    return number


def choose_threads(cgroup_root: Path = Path("/sys/fs/cgroup"),
                   unet_parameters: Optional[int] = None) -> ThreadChoice:
    """``IMPUS_LITE_THREADS`` if set, else ``OMP_NUM_THREADS`` if set, else one thread for a UNet
    of fewer than :data:`SMALL_UNET_PARAMETERS` parameters, else the smaller of the affinity
    mask and the cgroup quota rounded up (at least 1)."""
    affinity, quota = affinity_cpus(), cgroup_cpu_limit(cgroup_root)
    small = unet_parameters is not None and unet_parameters < SMALL_UNET_PARAMETERS
    for name in (THREADS_VARIABLE, "OMP_NUM_THREADS"):
        given = _positive_int(name)
        if given is not None:
            return ThreadChoice(given, name, affinity, quota, small)
    if small:
        return ThreadChoice(1, "small model", affinity, quota, small)
    if quota is not None and math.ceil(quota) < affinity:
        return ThreadChoice(max(1, math.ceil(quota)), "cgroup quota", affinity, quota)
    return ThreadChoice(affinity, "CPU affinity", affinity, quota)


def apply_threads(choice: Optional[ThreadChoice] = None, unet_parameters: Optional[int] = None) -> ThreadChoice:
    """Give torch ``choice.threads`` intra-op threads (default: :func:`choose_threads` for a
    UNet of ``unet_parameters``); :func:`thread_report` reports it."""
    import torch

    choice = choice or choose_threads(unet_parameters=unet_parameters)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    _APPLIED["choice"] = choice
    return choice


def thread_report() -> dict:
    """What a result records: torch's threads now, the choice behind them, and the OpenMP wait
    policy (value and who set it; "too late" means torch loaded before impus_lite could)."""
    import torch

    choice = _APPLIED["choice"] or choose_threads()
    state = _WAIT_POLICY_STATE["set_by"] or prepare_environment()
    return {"torch_threads": torch.get_num_threads(), **asdict(choice),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "wait_policy_set_by": state}


def thread_line(report: Optional[dict] = None) -> str:
    """One sentence for the CLI and the notebooks' runtime cell."""
    r = report or thread_report()
    count = r["torch_threads"]
    line = f"CPU: {count} torch thread{'s' if count != 1 else ''} ({r['source']}; {r['affinity']} CPUs"
    line += f", quota {r['quota']:g} cores)" if r["quota"] is not None else ")"
    if r["wait_policy_set_by"] == "too late":
        return (line + "; torch was imported before impus_lite, so waiting threads may spin: on a "
                "shared machine set OMP_WAIT_POLICY=PASSIVE before starting Python.")
    sleeping = r["omp_wait_policy"].upper() == "PASSIVE"
    line += f"; waiting threads {'sleep' if sleeping else 'follow ' + r['omp_wait_policy']}."
    if sleeping and count > 1 and r.get("small_model"):
        line += (" Sleeping threads make a small model slower than one thread (the README morph on 2 cores: "
                 "33 s against 21 s of stages); on a machine of your own, OMP_WAIT_POLICY=ACTIVE makes "
                 "them faster, on a shared one it stalls the others.")
    return line
