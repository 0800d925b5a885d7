"""A whole class on one machine: N morphs started at once, against N times one morph.

``python -m impus_lite bench --concurrent 1 2 4`` runs the README's morph (classroom model, emoji
pair, 9 frames, no cache) as separate processes, as N students' kernels would, all started at
the same moment, and reports for each N the wall time until the last one finishes against N
times the wall time of one alone:

    slowdown(N) = wall(N) / (N * wall(1))

1 means the machine is shared without loss (N morphs take exactly as long as running them one
after another); above 1 they stall each other (spinning OpenMP threads, oversubscribed cores).
Each process chooses its threads as :mod:`impus_lite.threads` does. ``wait_policy`` sets
``OMP_WAIT_POLICY`` for the children ("passive", what impus_lite sets when nothing else does;
"active" spins, to see the difference; None leaves the environment as it is).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import InputError
from .runtime import data_path

#: The README morph, as its command line has it (without --out).
README_MORPH = ["morph", str(data_path("pairs", "emoji_cat_dog", "cat_face.png")),
                str(data_path("pairs", "emoji_cat_dog", "dog_face.png")), "--prompt", "cat face dog face",
                "--model", "classroom", "--frames", "9", "--no-cache"]
WAIT_POLICIES = ("passive", "active")


def _environment(wait_policy: Optional[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if wait_policy is not None:
        if wait_policy not in WAIT_POLICIES:
            raise InputError(f"Unknown wait policy '{wait_policy}': use {' or '.join(WAIT_POLICIES)}.")
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    return env


def run_together(count: int, out_dir: Path, wait_policy: Optional[str] = None,
                 command: Sequence[str] = README_MORPH, timeout: float = 3600) -> dict:
    """Start ``count`` morph processes at once; wait for all.

    Returns ``wall_seconds`` (first start to last finish), each process's ``stage_seconds`` (the
    sum of its stages, from its morph.json) and the ``threads`` it recorded."""
    if count < 1:
        raise InputError(f"Concurrent morphs must be >= 1, got {count}.")
    env = _environment(wait_policy)
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-m", "impus_lite", *command, "--out", str(out_dir / f"{count}-{k}")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for k in range(count)]
    errors = [p.communicate(timeout=timeout)[1] for p in processes]
    wall = time.perf_counter() - start
    failed = [e for p, e in zip(processes, errors) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"a concurrent morph failed: {failed[0][-2000:]}")
    summaries = [json.loads((out_dir / f"{count}-{k}" / "morph.json").read_text()) for k in range(count)]
    return {"count": count, "wall_seconds": round(wall, 2),
            "stage_seconds": [s["seconds"] for s in summaries], "threads": summaries[0]["threads"]}


def concurrent_morphs(counts: Sequence[int] = (1, 2, 4), wait_policy: Optional[str] = None,
                      out_dir: Optional[Path] = None) -> dict:
    """:func:`run_together` for 1 (always first: the reference) and each of ``counts``.

    Returns ``runs`` (one per count) and, per count, ``slowdown`` = wall(N) / (N wall(1))."""
    counts = sorted(set(counts) | {1})
    with tempfile.TemporaryDirectory(prefix="impus_lite_load_") as scratch:
        folder = Path(out_dir or scratch)
        runs = [run_together(n, folder, wait_policy) for n in counts]
    single = runs[0]["wall_seconds"]
    for run in runs:
        run["serial_seconds"] = round(run["count"] * single, 2)
        run["slowdown"] = round(run["wall_seconds"] / run["serial_seconds"], 3)
    return {"wait_policy": (wait_policy or os.environ.get("OMP_WAIT_POLICY", "passive")).lower(),
            "cpus": os.cpu_count(), "runs": runs}


def format_concurrent(report: dict) -> str:
    """The report as a table: N, wall time, N x one morph, slowdown, stage seconds per morph."""
    import torch

    from .runtime import machine_description

    threads = report["runs"][0]["threads"]
    workers = threads.get("workers", 1)
    lines = [f"machine: {machine_description(torch.device('cpu'))}", f"OMP_WAIT_POLICY for the morphs: {report['wait_policy']}; "
             f"threads per morph: {threads['torch_threads']} ({threads['source']})"
             + (f", up to {workers} batch workers where CPUs are idle" if workers > 1 else ""), "",
             f"{'morphs':>6} {'wall s':>8} {'N x one':>8} {'slowdown':>9}  stage seconds per morph"]
    for run in report["runs"]:
        stages = ", ".join(f"{s:.1f}" for s in run["stage_seconds"])
        lines.append(f"{run['count']:>6} {run['wall_seconds']:>8.1f} {run['serial_seconds']:>8.1f} "
                     f"{run['slowdown']:>9.2f}  {stages}")
    return "\n".join(lines)
