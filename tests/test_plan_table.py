"""benchmarks/plan_table.py: the planned what-each-model-needs table, from the planner's search."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("model", "params", "GPU", "GPUs", "precision", "sharding", "wrap", "AC", "compile", "CPU offload",
           "batch/GPU", "peak GB/GPU", "tokens/s", "speed from")


def test_plan_table_for_a_tiny_model_writes_the_table_the_json_and_the_readme_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- plan_table:start (benchmarks/plan_table.py --readme README.md writes this) -->\n"
                      "old table\n<!-- plan_table:end -->\n\n## after\n")
    result = subprocess.run([sys.executable, "benchmarks/plan_table.py", "--models", "t5_tiny", "--gpus", "h100",
                             "--worlds", "8", "1", "--output-dir", str(tmp_path), "--readme", str(readme)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    table = (tmp_path / "plan_table.md").read_text()
    assert "PLANNED, not measured" in table and "512 source / 128 target" in table
    assert "| " + " | ".join(COLUMNS) + " |" in table
    row = next(line for line in table.splitlines() if line.startswith("| t5_tiny"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == len(COLUMNS) and cells[2] == "H100 80GB" and cells[3] == "1"  # one GPU tried first

    payload = json.loads((tmp_path / "plan_table.json").read_text())
    assert payload["planned_not_measured"] is True
    assert {"command", "commit", "date"} <= payload["provenance"].keys()
    (found,) = payload["rows"]
    assert found["world"] == 1 and [t["world"] for t in found["tried"]] == [1]  # stopped at the first that fits
    assert found["variant"] == "any" and not found["cpu_offload"] and found["tried"][0]["fit"] >= 1
    assert 0 < found["peak_gb"] <= 80 and found["batch"] >= 1 and found["tokens_per_s"] > 0
    assert payload["t5_11b_on_h200_check"] is None  # only with t5_11b and h200 selected

    text = readme.read_text()
    assert "old table" not in text and "| t5_tiny" in text and text.endswith("<!-- plan_table:end -->\n\n## after\n")
