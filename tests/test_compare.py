"""fsdp-kit compare: a table and a PNG over real runs that differ in one setting."""

from __future__ import annotations

import pytest
from helpers import job, run_ranks, train

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
    assert header == ["run", "final loss", "eval loss", "exact match", "TFLOPS/GPU", "tokens/s", "peak mem GB",
                      "optim.lr"], "the only recipe difference is the learning rate"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["0", "1"] and [row[-1] for row in rows] == ["0.001", "0.0003"]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0 and float(row[4]) > 0 and float(row[5].replace(",", "")) > 0
    assert rows[0][1] != rows[1][1], "different learning rates, different losses"
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
