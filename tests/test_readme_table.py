"""benchmarks/readme_table.py: the README's performance table is generated from the newest GPU results."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import readme_table  # noqa: E402
from benchmarks.common import write_csv  # noqa: E402


def _row(case, mode, provider, p50, device, timestamp):
    return dict(case=case, provider=provider, mode=mode, metric="time", unit="ms", shape="s", p50=p50, p20=p50,
                p80=p50, device=device, git_sha="abc123", torch="2.11", triton="3.6", timestamp=timestamp)


def test_the_committed_readme_is_current():
    assert readme_table.main(["--check"]) == 0


def test_newest_gpu_folder_wins_and_cpu_folders_are_ignored(tmp_path):
    write_csv([_row("detr", "step", "original", 40.0, "NVIDIA H100", "2026-11-01T00:00:00")],
              tmp_path / "2026-11-01-h100" / "results.csv")
    write_csv([_row("detr", "step", "original", 30.0, "NVIDIA H200", "2026-11-20T00:00:00"),
               _row("detr", "step", "fastdetr-triton", 2.0, "NVIDIA H200", "2026-11-20T00:00:00")],
              tmp_path / "2026-11-20-h200" / "results.csv")
    write_csv([_row("detr", "step", "original", 9.0, "cpu", "2026-11-30T00:00:00")],
              tmp_path / "2026-11-30-cpu" / "results.csv")
    table = readme_table.render(tmp_path)
    assert "NVIDIA H200" in table and "15.00x" in table and "H100" not in table
    readme = f"intro\n{readme_table.BEGIN}\nSTALE-TABLE\n{readme_table.END}\nrest\n"
    rewritten = readme_table.rewrite(readme, table)
    assert "STALE-TABLE" not in rewritten and rewritten.startswith("intro\n") and rewritten.endswith("rest\n")


def test_no_gpu_results_says_so(tmp_path):
    assert "No GPU result is committed yet" in readme_table.render(tmp_path)
