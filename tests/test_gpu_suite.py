"""benchmarks/gpu_suite.sh: every step runs, a failed step is recorded and does not stop the rest."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def test_steps_run_in_order_and_failures_are_reported(tmp_path):
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"   # stands in for the interpreter: logs its arguments, fails the kernel report
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
cat > /dev/null
case "$*" in *fastdetr.kernels.report*) echo "report broke"; exit 3;; esac
exit 0
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": str(fake), "PATH": "/usr/bin:/bin"}   # no nvidia-smi on this PATH
    proc = subprocess.run(["bash", str(SUITE), str(results)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (results / "summary.txt").read_text().splitlines()
    steps = [line.split()[0] for line in summary]
    assert steps == ["environment", "pytest", "report", "memory", "benchmarks"]
    assert [line.split()[1] for line in summary] == ["ok", "ok", "FAILED", "ok", "ok"]
    assert "report broke" in (results / "logs" / "report.log").read_text()
    logged = calls.read_text()
    assert "-m pytest" in logged and "tests/test_gpu.py" in logged
    assert "benchmarks/run.py --suites ceiling ops attention layers model matcher" in logged
