"""benchmarks/gpu_suite.sh: every step runs under its limit, outcomes land in summary.txt and one archive, and
a dry run in what a lent GPU machine has (no venv, no fastdetr install, no pycocotools) goes through."""
from __future__ import annotations

import csv
import importlib.metadata
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
STEPS = ["environment", "bench-ceiling", "bench-ops", "bench-attention", "bench-layers", "bench-model",
         "bench-matcher", "bench-deformable_attention", "pytest", "convergence", "memory", "report"]
SMOKE_STEPS = ["environment", "bench", "pytest", "convergence", "memory", "report"]   # --smoke: one bench step


def _fake_python(tmp_path: Path, script: str) -> tuple[Path, Path]:
    """An executable standing in for the interpreter: logs its arguments to calls.txt, then runs `script`."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\ncat > /dev/null\n{script}\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake, calls


def _summary(results: Path) -> list[list[str]]:
    return [line.split() for line in (results / "summary.txt").read_text().splitlines()]


def test_steps_run_in_order_and_failures_are_reported(tmp_path):
    fake, calls = _fake_python(tmp_path, 'case "$*" in *fastdetr.kernels.report*) echo "report broke"; exit 3;; esac')
    results, archive = tmp_path / "results", tmp_path / "out" / "results.tgz"
    env = {**os.environ, "PYTHON": str(fake), "PATH": "/usr/bin:/bin"}   # no nvidia-smi on this PATH
    proc = subprocess.run(["bash", str(SUITE), "--archive", str(archive), str(results)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = _summary(results)
    assert [line[0] for line in summary] == STEPS
    assert [line[1] for line in summary] == ["ok"] * (len(STEPS) - 1) + ["FAILED"]
    assert "report broke" in (results / "logs" / "report.log").read_text()
    logged = calls.read_text()
    assert "-m pytest" in logged and "tests/test_gpu.py" in logged
    for suite in ("ceiling", "ops", "attention", "layers", "model", "matcher", "deformable_attention"):
        assert f"benchmarks/run.py --quick --suites {suite} --append --out {results}" in logged
    assert "benchmarks/convergence.py --short --budget-s" in logged
    with tarfile.open(archive) as packed:   # packed on exit, the failed step's log included
        assert {"results/summary.txt", "results/logs/report.log"} <= set(packed.getnames())
    closing = proc.stdout[proc.stdout.rindex("== fastdetr GPU suite"):]   # the table that ends the output
    assert "report           FAILED" in closing and "failed: report" in closing


def test_a_hung_step_is_stopped_at_the_budget_and_the_rest_recorded(tmp_path):
    fake, _ = _fake_python(tmp_path, 'case "$*" in *"--suites ops"*) echo "hanging"; exec sleep 60;; esac')
    results, archive = tmp_path / "results", tmp_path / "results.tgz"
    env = {**os.environ, "PYTHON": str(fake), "PATH": "/usr/bin:/bin", "GPU_SUITE_MIN_STEP_S": "1"}
    proc = subprocess.run(["bash", str(SUITE), "--budget", "4", "--archive", str(archive), str(results)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    outcomes = {line[0]: line[1] for line in _summary(results)}
    assert list(outcomes) == STEPS
    assert outcomes["bench-ceiling"] == "ok" and outcomes["bench-ops"] == "TIMEOUT"
    assert set(list(outcomes.values())[STEPS.index("bench-ops") + 1:]) == {"skipped"}   # no budget left
    assert "hanging" in (results / "logs" / "bench-ops.log").read_text()
    with tarfile.open(archive) as packed:
        assert "results/logs/bench-ops.log" in packed.getnames()


def test_a_suite_told_to_stop_ends_its_step_records_it_and_packs(tmp_path):
    fake, _ = _fake_python(tmp_path, 'case "$*" in *"--suites ops"*) echo "hanging"; exec sleep 60;; esac')
    results, archive = tmp_path / "results", tmp_path / "results.tgz"
    env = {**os.environ, "PYTHON": str(fake), "PATH": "/usr/bin:/bin"}
    suite = subprocess.Popen(["bash", str(SUITE), "--archive", str(archive), str(results)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = results / "logs" / "bench-ops.log"
    for _ in range(200):   # until the hanging step has started
        if log.exists() and "hanging" in log.read_text():
            break
        time.sleep(0.05)
    suite.terminate()
    output, _ = suite.communicate(timeout=30)
    assert suite.returncode == 143, output
    assert [line[:2] for line in _summary(results)][-1] == ["bench-ops", "STOPPED"]
    assert "failed: bench-ops" in output
    with tarfile.open(archive) as packed:
        assert "results/logs/bench-ops.log" in packed.getnames()


def test_a_results_folder_with_files_is_refused(tmp_path):
    (tmp_path / "old.csv").write_text("x")
    proc = subprocess.run(["bash", str(SUITE), str(tmp_path)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "not empty" in proc.stderr


# ---- the dry run ------------------------------------------------------------------------------
# What the GPU machines have that the suite uses (their image also has onnx, onnxruntime, pytest-timeout):
GPU_IMAGE = ("torch", "triton", "numpy", "scipy", "pillow", "tqdm", "matplotlib", "pytest")
# torch requires setuptools, which the image may well have; left out, it shows the suite needs no install step
LEFT_OUT = ("setuptools",)


def _with_dependencies(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `names` and everything they require (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    found: dict[str, importlib.metadata.Distribution] = {}
    pending = list(names)
    while pending:
        name = pending.pop().lower().replace("_", "-")
        if name in found or name in LEFT_OUT:
            continue
        dist = importlib.metadata.distribution(name)
        found[name] = dist
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(found.values())


def _bare_environment(root: Path) -> Path:
    """A venv holding GPU_IMAGE and their dependencies only (symlinked from this interpreter's site-packages):
    no fastdetr, no pycocotools, no setuptools, no pytest plugins. Returns its bin/ folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for dist in _with_dependencies(GPU_IMAGE):
        source = Path(dist.locate_file(""))
        for top in {Path(str(file)).parts[0] for file in dist.files or ()}:
            if top not in ("..", "__pycache__") and not (site / top).exists() and (source / top).exists():
                (site / top).symlink_to(source / top)
    check = ("import importlib.util as u; "
             "print([m for m in ('fastdetr', 'pycocotools', 'setuptools', 'xdist') if u.find_spec(m)])")
    found = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=root, check=True)
    assert found.stdout.strip() == "[]", f"the bare environment is not bare: {found.stdout}"
    return root / "bin"


def _copy_of_the_tree(target: Path) -> Path:
    """What a device run gets: tracked files and untracked ones git does not ignore (no .venv, no out/)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"the dry run copies the tree as git lists it; git failed: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_dry_run_in_the_gpu_machines_environment(tmp_path):
    """The whole suite with --smoke from a copy of the tree, in a Python with only what the GPU image has:
    an import the machine lacks (pycocotools, a dev tool), a step that needs .venv or the source checkout's
    ignored files, or a wrong path fails here instead of on a lent GPU."""
    tree = _copy_of_the_tree(tmp_path / "tree")
    bin_dir = _bare_environment(tmp_path / "env")
    keep = ("HOME", "LANG", "TMPDIR")
    env = {**{k: os.environ[k] for k in keep if k in os.environ}, "PATH": f"{bin_dir}:/usr/bin:/bin",
           "TRITON_INTERPRET": "1", "FASTDETR_GPU_TESTS_ON_CPU": "1"}
    results, archive = tmp_path / "results", tmp_path / "out" / "results.tgz"
    proc = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_suite.sh"), "--smoke", "--budget", "300",
                           "--archive", str(archive), str(results)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=360)
    logs = {log.name: log.read_text()[-3000:] for log in (results / "logs").glob("*.log")}
    failing = {name: text for name, text in logs.items() if name.removesuffix(".log") not in
               {line[0] for line in _summary(results) if line[1] == "ok"}}
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n".join(f"== {n}\n{t}" for n, t in failing.items())
    assert [line[:2] for line in _summary(results)] == [[step, "ok"] for step in SMOKE_STEPS]
    assert f"fastdetr from {tree.resolve()}" in logs["environment.log"]
    assert "pycocotools not installed" in logs["environment.log"]
    with tarfile.open(archive) as packed:
        names = set(packed.getnames())
    assert {"results/results.csv", "results/results.md", "results/pytest.xml", "results/kernel_report.json",
            "results/convergence/results.md", "results/headline.txt"} <= names
    with (results / "results.csv").open(newline="") as table:
        cases = {row["case"] for row in csv.DictReader(table)}
    assert {"ceiling", "in_projection", "encoder_pad25", "transformer", "detr_r50", "smoke",
            "msda_smoke_encoder"} <= cases
    assert "AP not measured: pycocotools is not installed" in (results / "convergence" / "results.md").read_text()
    assert " passed" in logs["pytest.log"] and "failed" not in logs["pytest.log"].splitlines()[-1]
