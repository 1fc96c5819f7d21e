"""``fsdp-kit bench`` end to end on CPU with the tiny model: every lever side measured at its own searched batch,
shared configurations run once, JSON + markdown + PNG written, published factors cited or n/a."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from fsdp_kit import cli
from fsdp_kit.bench.levers import LEVERS, select
from fsdp_kit.errors import ConfigError

TINY = ["data.max_source_len=48", "data.max_target_len=8", "data.eval_examples=16", "trainer.batch_size=4",
        "trainer.auto_batch_max=8"]


def test_bench_measures_each_lever_off_and_on_and_writes_json_markdown_and_chart(tmp_path, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    code = cli.main(["bench", "--levers", "bf16,ac", "--steps", "3", "--out", str(tmp_path), *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("bench:   batch") == 3, "the base recipe (bf16 on = ac on) must run once"
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["provenance"]["device"] == "cpu" and record["provenance"]["steps"] == 3
    by_name = {lever["lever"]: lever for lever in record["levers"]}
    assert list(by_name) == ["bf16", "ac"]
    for lever in by_name.values():
        for side in ("off", "on"):
            numbers = lever[side]["numbers"]
            assert numbers["batch_size"] == 8 and numbers["tflops_per_gpu"] > 0 and numbers["tokens_per_s"] > 0
            assert lever[side]["search"]["event"] == "auto_batch"
        assert lever["tflops_gain"] == pytest.approx(lever["on"]["numbers"]["tflops_per_gpu"]
                                                     / lever["off"]["numbers"]["tflops_per_gpu"])
    assert by_name["bf16"]["on"]["numbers"] == by_name["ac"]["on"]["numbers"]
    assert "precision=fp32" in by_name["bf16"]["off"]["overrides"]
    assert by_name["bf16"]["published"]["factor"] == 4.0 and by_name["ac"]["published"] is None
    table = (tmp_path / "bench.md").read_text()
    assert "| bf16 |" in table and "up to 4x" in table and "| ac |" in table and "n/a" in table
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_lever_turns_something_and_names_are_unique():
    assert len({lever.name for lever in LEVERS}) == len(LEVERS)
    for lever in LEVERS:
        assert lever.off and lever.on and lever.off != lever.on
    with pytest.raises(ConfigError, match="unknown lever 'fp8'"):
        select(["bf16", "fp8"])


# --- issue 21 §5: bad output paths and reference records are refused before the first lever is measured ---------
OUT_CASES = [
    ("out-is-a-file", ["--out", "taken"], "--out taken is a file, not a folder"),
    ("out-inside-a-file", ["--out", "taken/bench"], "--out taken/bench would be inside taken, which is a file"),
    ("out-not-writable", ["--out", "/sys/bench"], "--out /sys/bench: /sys is not writable"),
    ("out-holds-a-folder-named-like-a-result", ["--out", "results"], "results/bench.md is a folder"),
    ("reference-not-json", ["--reference", "broken.json"], "--reference broken.json is not JSON"),
    ("reference-not-a-probe-record", ["--reference", "list.json"], "--reference list.json is not a GPU probe record"),
]


@pytest.mark.parametrize(("args", "message"), [case[1:] for case in OUT_CASES], ids=[case[0] for case in OUT_CASES])
def test_bench_refuses_its_outputs_and_reference_before_measuring(args, message, tmp_path):
    (tmp_path / "taken").write_text("keep me")
    (tmp_path / "results" / "bench.md").mkdir(parents=True)
    (tmp_path / "broken.json").write_text('{"runs": [')
    (tmp_path / "list.json").write_text('[{"label": "a"}]')
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    env = {"RANK": "0", "WORLD_SIZE": "1"}
    outcome = run_cli("bench", "--levers", "ac", "--steps", "2", *args, *TINY, cwd=tmp_path, env=env, timeout=120)
    assert outcome.code == 2 and "Traceback" not in outcome.stderr, outcome.stderr
    assert len(outcome.error_lines) == 1 and message in outcome.error_lines[0], outcome.stderr
    assert "Fix:" in outcome.error_lines[0] and "bench: ac" not in outcome.stdout, "nothing measured"
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and (tmp_path / "taken").read_text() == "keep me"
