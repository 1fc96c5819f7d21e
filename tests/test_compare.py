"""fsdp-kit compare: a table and a PNG over real runs that differ in one setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import job, run_cli, run_ranks, train

from fsdp_kit.cli import main
from fsdp_kit.compare import compare


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-point 'sweep' laid out like Hydra's multirun folder (one numbered run dir per point)."""
    root = tmp_path_factory.mktemp("multirun")
    for point, lr in enumerate(("1e-3", "3e-4")):
        run_ranks(train, 1, job(root / str(point), "trainer.max_steps=4", "trainer.eval_every=2",
                                f"optim.lr={lr}"))
    return root


def test_compare_tables_the_runs_and_the_setting_that_differs(sweep, tmp_path, capsys):
    assert main(["compare", str(sweep), "--plot", str(tmp_path / "curves.png")]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["run", "status", "final loss", "eval loss", "exact match", "TFLOPS/GPU", "tokens/s",
                      "peak mem GB", "optim.lr"], "the only recipe difference is the learning rate"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["0", "1"] and [row[-1] for row in rows] == ["0.001", "0.0003"]
    for row in rows:
        assert row[1] == "finished"
        assert float(row[2]) > 0 and float(row[3]) > 0 and float(row[5]) > 0 and float(row[6].replace(",", "")) > 0
    assert rows[0][2] != rows[1][2], "different learning rates, different losses"
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert f"wrote {tmp_path / 'curves.png'}" in out.err


def test_compare_accepts_run_dirs_and_reads_the_summary(sweep):
    table, png = compare([sweep / "1", sweep / "0"], plot_path=None)
    assert png is None
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| 1 |") and rows[1].startswith("| 0 |"), "in the order given"
    assert "optim.lr" in table.splitlines()[0]


def test_compare_refuses_a_folder_without_runs_in_one_line(sweep, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(sweep / "0"), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no metrics.jsonl" in err[0] and "Fix:" in err[0]


# --- issue 21 §5, §6: one line for every bad file, and a table that tells the truth -------------------------------
def _run(folder: Path, metrics: str | bytes, config: str | bytes | None = "optim:\n  lr: 0.001\n") -> Path:
    folder.mkdir(parents=True)
    data = metrics.encode() if isinstance(metrics, str) else metrics
    (folder / "metrics.jsonl").write_bytes(data)
    if config is not None:
        (folder / "resolved_config.yaml").write_bytes(config.encode() if isinstance(config, str) else config)
    return folder


GOOD = '{"step": 1, "loss": 2.5, "tokens_per_s": 10.0}\n'
BAD_FILES = [
    ("json-not-an-object", "[1, 2]\n", None, "line 1 is JSON but not a record (list"),
    ("json-scalar", GOOD + "7\n", None, "line 2 is JSON but not a record (int"),
    ("not-utf8", b'{"step": 1, "loss": 2.5}\n\xff\xfe\n', None, "is not UTF-8 text (byte 25 is 0xff)"),
    ("record-without-step", '{"loss": 2.5}\n', None, "line 1 has a loss but no integer step"),
    ("broken-config", GOOD, "optim: [1, 2\n", "resolved_config.yaml is not valid YAML at line 2"),
    ("scalar-config", GOOD, "42\n", "resolved_config.yaml holds a int, not a config"),
    ("config-not-utf8", GOOD, b"optim:\n  lr: \xff\n", "resolved_config.yaml is not UTF-8 text"),
]


@pytest.mark.parametrize(("metrics", "config", "message"), [case[1:] for case in BAD_FILES],
                         ids=[case[0] for case in BAD_FILES])
def test_a_bad_run_file_is_one_line(metrics, config, message, tmp_path):
    _run(tmp_path / "run", metrics, config if config is not None else "optim:\n  lr: 0.001\n")
    outcome = run_cli("compare", "run", cwd=tmp_path)
    assert outcome.code == 2 and "Traceback" not in outcome.stderr, outcome.stderr
    assert len(outcome.error_lines) == 1 and message in outcome.error_lines[0], outcome.stderr
    assert "Fix:" in outcome.error_lines[0]
    assert not (tmp_path / "compare.png").exists()


def test_an_unknown_plot_extension_is_refused_before_reading_runs(tmp_path):
    _run(tmp_path / "run", GOOD)
    outcome = run_cli("compare", "run", "--plot", "x.xyz", cwd=tmp_path)
    assert outcome.code == 2 and len(outcome.error_lines) == 1, outcome.stderr
    assert "--plot x.xyz has extension .xyz, which matplotlib cannot write" in outcome.error_lines[0]
    assert "compare.png" in outcome.error_lines[0] and not (tmp_path / "x.xyz").exists()


@pytest.fixture(scope="module")
def finished_twice(tmp_path_factory):
    """A run trained to its end, then started again with the same command (it resumes at max_steps, trains
    nothing and writes a second summary, without rates)."""
    run_dir = tmp_path_factory.mktemp("rerun") / "run"
    first = run_ranks(train, 1, job(run_dir, "trainer.max_steps=6", "checkpoint.at_end=true"))[0]
    run_ranks(train, 1, job(run_dir, "trainer.max_steps=6", "checkpoint.at_end=true"))
    return run_dir, first.summary


def _rows(outcome) -> dict[str, dict[str, str]]:
    lines = outcome.stdout.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {row[0]: dict(zip(header, row)) for row in
            ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:])}


def test_a_run_started_again_after_it_finished_shows_its_own_summary(finished_twice, tmp_path):
    run_dir, summary = finished_twice
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps_measured"] for r in records if r.get("summary")] == [summary["steps_measured"], 0]
    row = _rows(run_cli("compare", "--no-plot", str(run_dir), cwd=tmp_path))[str(run_dir.resolve())]
    assert row["status"] == "finished"
    assert float(row["tokens/s"].replace(",", "")) == pytest.approx(summary["tokens_per_s"], rel=1e-3), \
        "the run's measured windows, not the last log window"
    assert float(row["TFLOPS/GPU"]) == pytest.approx(summary["tflops_per_gpu"], rel=1e-3)


def test_a_killed_run_is_marked_unfinished_without_rates(finished_twice, tmp_path):
    run_dir, _ = finished_twice
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(run_dir / "resolved_config.yaml", killed)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    at_step_3 = next(n for n, line in enumerate(lines) if json.loads(line).get("step") == 3 and "loss" in line)
    (killed / "metrics.jsonl").write_text("\n".join(lines[:at_step_3 + 1]) + "\n")  # what a kill at step 3 leaves
    outcome = run_cli("compare", str(killed), str(run_dir), "--plot", "curves.png", cwd=tmp_path)
    assert outcome.code == 0, outcome.stderr
    rows = {("killed" if name.endswith("killed") else "rerun"): row for name, row in _rows(outcome).items()}
    assert rows["killed"]["status"] == "step 3 of 6, unfinished"
    assert rows["killed"]["tokens/s"] == rows["killed"]["TFLOPS/GPU"] == rows["killed"]["peak mem GB"] == "n/a"
    assert float(rows["killed"]["final loss"]) == pytest.approx(json.loads(lines[at_step_3])["loss"], rel=1e-3)
    assert rows["rerun"]["status"] == "finished"
    assert (tmp_path / "curves.png").stat().st_size > 10_000
