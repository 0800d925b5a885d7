"""CPU threads for the machine this process actually has, and threads that yield when they wait.

A shared server (JupyterHub, a lab machine, Binder) runs several students' kernels at once.
Two things decide whether their morphs share the CPU or stall each other:

* **How many threads.** PyTorch starts one intra-op thread per core it sees, and it sees the
  host's cores, not a container's share of them. :func:`choose_threads` takes the smallest of
  the CPU affinity mask (``os.sched_getaffinity``) and the cgroup CPU quota (cgroup v2
  ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, rounded up), unless
  ``IMPUS_LITE_THREADS`` (or ``OMP_NUM_THREADS``) says otherwise. A large UNet (Stable
  Diffusion) gets them as torch's intra-op threads. A small UNet (below
  :data:`SMALL_UNET_PARAMETERS`, the classroom and tiny models) gets one torch thread, since its
  layers are too small to split (with waiting threads asleep the hand-offs cost more than a
  second core gives: the README morph on a 2-core AMD EPYC, 21.3 s of stages on one thread,
  33.0 s on two), and the cores as *batch workers* instead: Python threads that each run a
  chunk of a render pass's frames on one torch thread (:mod:`impus_lite.workers`).
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
        workers: batch workers (:mod:`impus_lite.workers`), each running ``threads`` torch threads.
    """

    threads: int
    source: str
    affinity: int
    quota: Optional[float]
    small_model: bool = False
    workers: int = 1


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


def machine_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, Optional[float], int]:
    """(affinity CPUs, cgroup quota in cores or None, the CPUs this process may use: the smaller
    of the affinity mask and the quota rounded up, at least 1)."""
    affinity, quota = affinity_cpus(), cgroup_cpu_limit(cgroup_root)
    usable = affinity if quota is None else max(1, min(affinity, math.ceil(quota)))
    return affinity, quota, usable


def choose_threads(cgroup_root: Path = Path("/sys/fs/cgroup"),
                   unet_parameters: Optional[int] = None) -> ThreadChoice:
    """How many CPU threads, and in what form, for a UNet of ``unet_parameters`` parameters.

    The CPUs to use: ``IMPUS_LITE_THREADS`` if set, else the smaller of the affinity mask and
    the cgroup quota rounded up. A UNet of fewer than :data:`SMALL_UNET_PARAMETERS` parameters
    gets them as batch workers of one torch thread each, a larger one (or an unknown one) as
    torch's intra-op threads. ``OMP_NUM_THREADS``, when set and ``IMPUS_LITE_THREADS`` is not,
    is taken as the intra-op thread count, with one worker.
    """
    affinity, quota, usable = machine_cpus(cgroup_root)
    small = unet_parameters is not None and unet_parameters < SMALL_UNET_PARAMETERS
    given = _positive_int(THREADS_VARIABLE)
    openmp = _positive_int("OMP_NUM_THREADS") if given is None else None
    if openmp is not None:
        return ThreadChoice(openmp, "OMP_NUM_THREADS", affinity, quota, small)
    if given is not None:
        source, cpus = THREADS_VARIABLE, given
    elif quota is not None and usable < affinity:
        source, cpus = "cgroup quota", usable
    else:
        source, cpus = "CPU affinity", usable
    if small:
        return ThreadChoice(1, "small model" if given is None else source, affinity, quota, True, cpus)
    return ThreadChoice(cpus, source, affinity, quota)


def apply_threads(choice: Optional[ThreadChoice] = None, unet_parameters: Optional[int] = None) -> ThreadChoice:
    """Give torch ``choice.threads`` intra-op threads (default: :func:`choose_threads` for a
    UNet of ``unet_parameters``); :func:`thread_report` reports it."""
    import torch

    choice = choice or choose_threads(unet_parameters=unet_parameters)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    _APPLIED["choice"] = choice
    return choice


def thread_report(choice: Optional[ThreadChoice] = None) -> dict:
    """What a result records: torch's threads now, the choice behind them (``choice``, else the
    one applied, else :func:`choose_threads`'s), and the OpenMP wait policy (value and who set
    it; "too late" means torch loaded before impus_lite could)."""
    import torch

    choice = choice or _APPLIED["choice"] or choose_threads()
    state = _WAIT_POLICY_STATE["set_by"] or prepare_environment()
    return {"torch_threads": torch.get_num_threads(), **asdict(choice),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "wait_policy_set_by": state}


def planned_thread_line(small_model: bool) -> str:
    """:func:`thread_line` for the threads a model will get once loaded, before one is: what
    :func:`choose_threads` gives a small UNet (the classroom and tiny models) or a large one.
    Once a model has been loaded (:func:`apply_threads`), the line of the threads it got."""
    if _APPLIED["choice"] is not None:
        return thread_line()
    choice = choose_threads(unet_parameters=0 if small_model else None)
    return thread_line({**thread_report(choice), "torch_threads": choice.threads})


def thread_line(report: Optional[dict] = None) -> str:
    """One sentence for the CLI and the notebooks' runtime cell."""
    r = report or thread_report()
    count, workers = r["torch_threads"], r.get("workers", 1)
    line = f"CPU: {count} torch thread{'s' if count != 1 else ''}"
    line += f" in each of {workers} batch workers" if workers > 1 else ""
    line += f" ({r['source']}; {r['affinity']} CPUs"
    line += f", quota {r['quota']:g} cores)" if r["quota"] is not None else ")"
    if r["wait_policy_set_by"] == "too late":
        return (line + "; torch was imported before impus_lite, so waiting threads may spin: on a "
                "shared machine set OMP_WAIT_POLICY=PASSIVE before starting Python.")
    sleeping = r["omp_wait_policy"].upper() == "PASSIVE"
    line += f"; waiting threads {'sleep' if sleeping else 'follow ' + r['omp_wait_policy']}."
    if sleeping and count > 1 and r.get("small_model"):
        line += (" Sleeping threads make a small model slower than one thread (the README morph on 2 cores: "
                 "33 s against 21 s of stages); IMPUS_LITE_THREADS instead of OMP_NUM_THREADS runs "
                 "that many batch workers of one torch thread each.")
    return line
