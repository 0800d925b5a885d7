import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from impus_lite import threads
from impus_lite.errors import InputError


def _cgroup_v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def test_cgroup_quota_in_cores_from_v2_and_v1(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    assert threads.cgroup_cpu_limit(_cgroup_v2(tmp_path / "a", "150000 100000\n")) == 1.5
    assert threads.cgroup_cpu_limit(_cgroup_v2(tmp_path / "b", "max 100000\n")) is None
    v1 = tmp_path / "c" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path / "c") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path / "c") is None
    assert threads.cgroup_cpu_limit(tmp_path / "missing") is None


def test_the_quota_caps_the_threads_and_the_variables_override_it(tmp_path, monkeypatch):
    monkeypatch.delenv("IMPUS_LITE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 64)
    root = tmp_path / "cg"
    root.mkdir()
    _cgroup_v2(root, "150000 100000")                        # 1.5 cores of a 64-core host
    choice = threads.choose_threads(root)
    assert (choice.threads, choice.source, choice.affinity, choice.quota) == (2, "cgroup quota", 64, 1.5)
    small = threads.choose_threads(root, unet_parameters=12_000_000)   # the quota's 2 CPUs as workers
    assert (small.threads, small.workers, small.small_model) == (1, 2, True)
    _cgroup_v2(root, "max 100000")
    assert threads.choose_threads(root) == threads.ThreadChoice(64, "CPU affinity", 64, None)
    assert threads.choose_threads(root, unet_parameters=12_000_000) == threads.ThreadChoice(1, "small model", 64, None, True, 64)
    assert threads.choose_threads(root, unet_parameters=860_000_000).threads == 64
    monkeypatch.setenv("OMP_NUM_THREADS", "3")                 # OpenMP's own variable: intra-op threads
    assert threads.choose_threads(root).threads == 3
    assert threads.choose_threads(root, unet_parameters=12_000_000) == threads.ThreadChoice(3, "OMP_NUM_THREADS", 64, None, True, 1)
    monkeypatch.setenv("IMPUS_LITE_THREADS", "5")
    assert threads.choose_threads(root) == threads.ThreadChoice(5, "IMPUS_LITE_THREADS", 64, None)
    assert threads.choose_threads(root, unet_parameters=12_000_000) == threads.ThreadChoice(1, "IMPUS_LITE_THREADS", 64, None, True, 5)
    monkeypatch.setenv("IMPUS_LITE_THREADS", "many")
    with pytest.raises(InputError, match="IMPUS_LITE_THREADS must be a whole number"):
        threads.choose_threads(root)


def _run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "IMPUS_LITE_THREADS")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_impus_lite_first_makes_waiting_threads_sleep():
    code = ("import json, os, impus_lite\nfrom impus_lite.threads import thread_report\n"
            "print(json.dumps(thread_report()))")
    report = _run(code)
    assert report["omp_wait_policy"] == "PASSIVE" and report["wait_policy_set_by"] == "impus_lite"
    assert _run(code, OMP_WAIT_POLICY="ACTIVE")["wait_policy_set_by"] == "environment"
    late = _run("import torch\n" + code)
    assert late["omp_wait_policy"] == "default" and late["wait_policy_set_by"] == "too late"
    assert "set OMP_WAIT_POLICY=PASSIVE" in threads.thread_line(late)


def test_loading_a_cpu_model_applies_the_choice():
    code = ("import json, torch, impus_lite\ntorch.set_num_threads(1)\n"
            "m = impus_lite.load_model('tiny', device='cpu')\n"
            "print(json.dumps({'threads': torch.get_num_threads(), 'workers': m.batch_workers}))")
    assert _run(code, IMPUS_LITE_THREADS="3") == {"threads": 1, "workers": 3}   # small: 3 workers
    assert _run(code, OMP_NUM_THREADS="2") == {"threads": 2, "workers": 1}
    small = ("import json, torch, impus_lite\nfrom impus_lite.threads import thread_report\n"
             "impus_lite.load_model('tiny', device='cpu')\nprint(json.dumps(thread_report()))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", small], env=env, capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["torch_threads"], report["source"]) == (1, "small model")


def test_the_load_test_compares_n_morphs_with_n_times_one(monkeypatch, tmp_path):
    from impus_lite import loadtest
    walls = {1: 10.0, 2: 24.0, 4: 52.0}
    seen = []

    def fake_run_together(count, folder, wait_policy=None):
        seen.append((count, wait_policy))
        return {"count": count, "wall_seconds": walls[count], "stage_seconds": [8.0] * count,
                "threads": {"torch_threads": 2, "source": "CPU affinity"}}

    monkeypatch.setattr(loadtest, "run_together", fake_run_together)
    report = loadtest.concurrent_morphs([4, 2], wait_policy="active", out_dir=tmp_path)
    assert seen == [(1, "active"), (2, "active"), (4, "active")]          # one alone first
    assert [r["slowdown"] for r in report["runs"]] == [1.0, 1.2, 1.3]      # 24 / (2 x 10), 52 / (4 x 10)
    assert [r["serial_seconds"] for r in report["runs"]] == [10.0, 20.0, 40.0]
    text = loadtest.format_concurrent(report)
    assert "active" in text and "1.30" in text and "2 (CPU affinity)" in text
    with pytest.raises(InputError, match="wait policy"):
        loadtest._environment("spin")


def test_the_thread_line_warns_when_sleeping_threads_split_a_small_model(monkeypatch):
    monkeypatch.delenv("IMPUS_LITE_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    small = threads.choose_threads(unet_parameters=5_000_000)
    large = threads.choose_threads(unet_parameters=860_000_000)
    assert (small.threads, small.small_model) == (2, True) and (large.threads, large.small_model) == (2, False)
    report = {"torch_threads": 2, "affinity": 2, "quota": None, "omp_wait_policy": "PASSIVE",
              "wait_policy_set_by": "impus_lite"}
    warning = "slower than one thread"
    assert warning in threads.thread_line({**report, **dataclasses.asdict(small)})
    assert warning not in threads.thread_line({**report, **dataclasses.asdict(large)})
    spinning = {**report, **dataclasses.asdict(small), "omp_wait_policy": "ACTIVE", "wait_policy_set_by": "environment"}
    assert warning not in threads.thread_line(spinning)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("IMPUS_LITE_THREADS", "2")
    workers = threads.choose_threads(unet_parameters=5_000_000)
    line = threads.thread_line({**report, **dataclasses.asdict(workers), "torch_threads": 1})
    assert warning not in line and "1 torch thread in each of 2 batch workers" in line


def test_the_runtime_cell_says_what_the_classroom_model_will_run_with_before_it_loads(monkeypatch):
    monkeypatch.delenv("IMPUS_LITE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda root=None: None)
    monkeypatch.setitem(threads._APPLIED, "choice", None)
    small, large = threads.planned_thread_line(small_model=True), threads.planned_thread_line(small_model=False)
    assert small.startswith("CPU: 1 torch thread in each of 2 batch workers (small model; 2 CPUs)")
    assert large.startswith("CPU: 2 torch threads (CPU affinity; 2 CPUs)")
    from impus_lite import runtime
    if not runtime.torch.cuda.is_available():
        assert small in runtime.gpu_report()
    applied = threads.ThreadChoice(3, "IMPUS_LITE_THREADS", 2, None)   # once a model has loaded: its threads
    monkeypatch.setitem(threads._APPLIED, "choice", applied)
    monkeypatch.setattr(threads, "thread_report", lambda: {"torch_threads": 3, **dataclasses.asdict(applied),
                                                           "omp_wait_policy": "PASSIVE", "wait_policy_set_by": "impus_lite"})
    assert threads.planned_thread_line(small_model=True).startswith("CPU: 3 torch threads (IMPUS_LITE_THREADS; 2 CPUs)")


def test_the_machine_line_names_the_kernels_and_the_native_bf16_units(monkeypatch):
    from impus_lite import models, runtime
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert runtime.cpu_kernels() == "AVX2 kernels" and not models.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.cpu_kernels() == "AVX2 kernels, AMX" and models.cpu_has_native_bf16()
    line = runtime.machine_description(torch.device("cpu"))
    assert line.startswith("CPU ") and "(AVX2 kernels, AMX)" in line
    with runtime.one_torch_thread():
        assert ", 1 torch thread," in runtime.machine_description(torch.device("cpu"))
