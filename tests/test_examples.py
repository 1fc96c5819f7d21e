"""The examples/t5 walk-through runs offline end to end: sample CSV -> train -> export -> generate + ROUGE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
    return result


def _cli(*args: str) -> None:
    result = run_cli(*args, cwd=ROOT, timeout=600)
    assert result.code == 0, (args, result.stdout[-2000:], result.stderr[-3000:])


def test_walkthrough_offline(tmp_path):
    csv_path = tmp_path / "wikihow_sample.csv"
    _run(sys.executable, "examples/t5/make_sample_csv.py", str(csv_path), "--rows", "300")
    run_dir = tmp_path / "run"
    # fsdp-kit train and export through their real entry point, each in a forked process (helpers.run_cli)
    _cli("train", "model=t5_tiny", "data=csv", f"data.path={csv_path}", "data.max_source_len=128",
         "data.max_target_len=48", "data.eval_examples=32", "trainer.max_steps=8", "trainer.eval_every=0",
         "trainer.eval_generate=false", f"hydra.run.dir={run_dir}")
    exported = tmp_path / "exported"
    _cli("export", str(run_dir / "checkpoints" / "step_8"), str(exported))
    out = _run(sys.executable, "examples/t5/summarize.py", str(exported), "--csv", str(csv_path), "--rows", "8",
               "--max-new-tokens", "16", "--predictions", str(tmp_path / "pred.jsonl"))
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert scores["rows"] == 8 and all(0.0 <= scores[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert len((tmp_path / "pred.jsonl").read_text().splitlines()) == 8
