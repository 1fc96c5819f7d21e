"""Careless and hostile input, run as a user types it: the exit code, one line naming the problem and the fix,
no traceback, and nothing in the run dir changed. Add a case here for every new one found.

The commands run through the real entry point (``fsdp_kit.cli.main``) in a forked copy of the test process
(``helpers.run_cli``: its own process, exit code and output, without a new interpreter's seconds of imports);
``test_the_console_script_refuses_with_one_line`` and a few others run the installed console script itself."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import Outcome, run_cli

BIN = Path(sys.executable).parent
FAST = ["data.num_examples=64", "data.eval_examples=16", "trainer.batch_size=4", "trainer.max_steps=2",
        "trainer.eval_every=0", "trainer.eval_generate=false", "metrics.progress=false"]


def fsdp_kit(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> Outcome:
    """``fsdp-kit ARGS`` as a user runs it, through the real entry point in a forked process."""
    return run_cli(*args, cwd=cwd, env=env, timeout=timeout)


def console_script(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> Outcome:
    """Run the installed console script itself, in a new interpreter."""
    result = subprocess.run([str(BIN / "fsdp-kit"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    return Outcome(result.returncode, result.stdout, result.stderr)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (to prove nothing was written, moved or deleted)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Case:
    """A command a user types, the exit code it must end with and a piece of its one error line."""

    id: str
    args: list[str]
    code: int
    message: str
    env: dict[str, str] = field(default_factory=dict)


def assert_rejected(outcome: Outcome, case: Case) -> None:
    assert outcome.code == case.code, f"{case.id}: exit {outcome.code}\n{outcome.stdout}\n{outcome.stderr}"
    assert "Traceback" not in outcome.stderr, f"{case.id}: traceback\n{outcome.stderr}"
    assert len(outcome.error_lines) == 1, f"{case.id}: want one error line\n{outcome.stderr}"
    line = outcome.error_lines[0]
    assert case.message in line, f"{case.id}: {line!r} does not say {case.message!r}"
    assert "Fix:" in line, f"{case.id}: {line!r} names no fix"


CLI_CASES = [
    Case("unknown-subcommand", ["trian"], 2, "invalid choice: 'trian'"),
    Case("no-subcommand", [], 2, "required: COMMAND"),
    Case("plan-unknown-option", ["plan", "cluster=h100", "precision=bf61"], 2, "precision/bf61"),
    Case("slurm-unknown-key", ["slurm", "--no-local-checks", "trainer.batch_sise=4"], 2, "batch_sise"),
    Case("missing-config-dir", ["plan", "--config-dir", "no/such/dir", "cluster=h100"], 2, "--config-dir"),
    Case("train-bad-enum", ["train", "sharding.strategy=fulll_shard"], 1, "fulll_shard"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_bad_command_lines_are_refused_with_one_line(case, tmp_path):
    run_dir = tmp_path / "run"
    args = case.args + ([f"hydra.run.dir={run_dir}", *FAST] if case.args[:1] == ["train"] else [])
    before = snapshot(tmp_path)
    outcome = fsdp_kit(*args, cwd=tmp_path, env=case.env)
    if case.args[:1] == ["train"]:  # Hydra's own composition errors are its multi-line text, exit 1
        assert outcome.code == case.code and case.message in outcome.stderr and "Traceback" not in outcome.stderr
    else:
        assert_rejected(outcome, case)
    assert snapshot(tmp_path) == before


def test_the_console_script_refuses_with_one_line(tmp_path):
    """The process-level contract, through the installed console script: argparse's usage errors, Hydra's own
    composition errors and the config's checks end the process with their exit codes and no traceback."""
    cases = {case.id: case for case in [*CLI_CASES, *TYPED_CASES]}
    for name in ("no-subcommand", "train-bad-enum", "train-plus-unknown-key"):
        case = cases[name]
        args = case.args + ([f"hydra.run.dir={tmp_path / 'run'}", *FAST] if case.args[:1] == ["train"] else [])
        outcome = console_script(*args, cwd=tmp_path)
        if name == "train-bad-enum":  # Hydra's composition error is its multi-line text, exit 1
            assert outcome.code == 1 and case.message in outcome.stderr and "Traceback" not in outcome.stderr
        else:
            assert_rejected(outcome, case)


def test_debug_env_shows_the_cause_with_its_traceback(tmp_path):
    quiet = console_script("plan", "--config-dir", "no/such/dir", cwd=tmp_path)
    loud = console_script("plan", "--config-dir", "no/such/dir", cwd=tmp_path, env={"FSDP_KIT_DEBUG": "1"})
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr and loud.error_lines == quiet.error_lines


# --- fsdp-kit compare (issue 14, item 6): paths that hold no runs -------------------------------------------------
COMPARE_CASES = [
    Case("compare-folder-without-runs", ["compare", "."], 2, "holds no metrics.jsonl"),
    Case("compare-missing-folder", ["compare", "no/such/run"], 2, "no/such/run is not a folder"),
    Case("compare-no-run-given", ["compare"], 2, "the following arguments are required: RUN_DIR"),
]


@pytest.mark.parametrize("case", COMPARE_CASES, ids=[case.id for case in COMPARE_CASES])
def test_compare_without_runs_is_refused_with_one_line(case, tmp_path):
    before = snapshot(tmp_path)
    assert_rejected(fsdp_kit(*case.args, cwd=tmp_path), case)
    assert snapshot(tmp_path) == before, "no compare.png or anything else written"


# --- planner (plan --search, lengths): bad planner options are refused with one line before any tracing ---
PLAN_CASES = [
    Case("plan-zero-source-len", ["plan", "--source-len", "0", "cluster=h100"], 2, "--source-len 0 must be > 0"),
    Case("plan-zero-top", ["plan", "--search", "--top", "0", "cluster=h100"], 2, "--top 0 must be > 0"),
    Case("plan-no-gpus", ["plan", "--search", "cluster=local"], 2, "describes no GPUs to plan for"),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[case.id for case in PLAN_CASES])
def test_bad_planner_options_are_refused_with_one_line(case, tmp_path):
    before = snapshot(tmp_path)
    assert_rejected(fsdp_kit(*case.args, cwd=tmp_path), case)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# Values, data files and model folders (issue #17 items 1, 2, 4; issue #13 items 11, 12).
# Most cases are refused before training, so they run in-process through compose_job + preflight (and the data
# loader, which train.py runs before any process group); a handful run as typed, through the console script.
# ---------------------------------------------------------------------------------------------------------------

import json  # noqa: E402

from helpers import job  # noqa: E402
from transformers import T5Config  # noqa: E402

from fsdp_kit.data.loader import build as build_data  # noqa: E402
from fsdp_kit.errors import ConfigError  # noqa: E402
from fsdp_kit.preflight import preflight  # noqa: E402

T5_SHAPE = T5Config(vocab_size=384, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
"""The tiny T5's HF config: the data layer needs its vocabulary size and pad id."""

VALUE_CASES = [
    (["optim.lr=nan"], "optim.lr=nan is not a finite number"),
    (["optim.lr=inf"], "optim.lr=inf is not a finite number"),
    (["optim.betas=[0.9,nan]"], "holds nan, not a finite number"),
    (["trainer.clip_grad_norm=nan"], "trainer.clip_grad_norm=nan is not a finite number"),
    (["trainer.clip_grad_norm=0"], "trainer.clip_grad_norm=0.0 must be > 0 (null turns clipping off)"),
    (["trainer.min_lr_ratio=1.5"], "trainer.min_lr_ratio=1.5 must be in [0, 1]"),
    (["trainer.min_lr_ratio=-0.1"], "trainer.min_lr_ratio=-0.1 must be in [0, 1]"),
    (["optim.eps=0"], "optim.eps=0.0 must be > 0"),
    (["optim.weight_decay=-0.01"], "optim.weight_decay=-0.01 must be >= 0"),
    (["dist.timeout_s=0"], "dist.timeout_s=0 must be > 0"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["data.max_skipped_fraction=2"], "data.max_skipped_fraction=2.0 must be in [0, 1]"),
    (["trainer.max_new_tokens=-1"], "trainer.max_new_tokens=-1 must be > 0"),
    (["cluster.nodes=0"], "cluster.nodes=0 must be > 0"),
    (["cluster.gpus_per_node=-1"], "cluster.gpus_per_node=-1 must be >= 0"),
    (["slurm.signal_before_s=-5"], "slurm.signal_before_s=-5 must be >= 0"),
    (["slurm.rdzv_port=0"], "slurm.rdzv_port=0 must be a port number in 1-65535"),
    (["slurm.rdzv_port=70000"], "slurm.rdzv_port=70000 must be a port number in 1-65535"),
    (["+trainer.foo=1"], "trainer.foo is not a setting"),
    (["+optim.lrr=0.1"], "optim.lrr is not a setting (did you mean optim.lr?)"),
    (["+model.hf_config.num_layer=4"], "model.hf_config.num_layer is not a setting of T5Config (did you mean "
                                       "num_layers?)"),
    (["model.hf_config.d_model=0"], "model.hf_config.d_model=0 must be > 0"),
    (["model.hf_config.dropout_rate=1.5"], "model.hf_config.dropout_rate=1.5 must be in [0, 1)"),
    (["model=gpt2_tiny", "data.max_source_len=250"], "= 258 tokens, more than the model's 256 positions"),
    (["model=gpt2_tiny", "trainer.max_new_tokens=300"], "= 348 tokens, more than the model's 256 positions"),
    (["model.pretrained=./no/such/model"], "model.pretrained='./no/such/model': the folder does not exist"),
]


@pytest.mark.parametrize(("overrides", "message"), VALUE_CASES, ids=[" ".join(c[0]) for c in VALUE_CASES])
def test_bad_values_are_refused_before_anything_starts(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        preflight(job(tmp_path / "run", *overrides), world_size=1, device_type="cpu")
    line = str(info.value)
    assert message in line and "Fix:" in line and "\n" not in line, line
    assert not (tmp_path / "run").exists()


def test_good_values_next_to_the_limits_pass(tmp_path):
    """The rules are not stricter than the models: T5's relative positions take any length, gpt2_tiny's table
    takes exactly 256 positions, and the edges of each range are allowed."""
    for overrides in (["data.max_source_len=4096"],
                      ["model=gpt2_tiny", "data.max_source_len=224", "data.max_target_len=32"],
                      ["trainer.min_lr_ratio=0", "trainer.min_lr_ratio=1", "trainer.clip_grad_norm=null",
                       "optim.weight_decay=0", "slurm.rdzv_port=65535", "data.max_skipped_fraction=0"]):
        preflight(job(tmp_path, *overrides), world_size=1, device_type="cpu")


def _lines(count: int, make) -> str:
    return "".join(make(i) for i in range(count))


def _jsonl(count: int, target=lambda i: f"h{i}") -> str:
    return _lines(count, lambda i: json.dumps({"text": f"article {i}", "headline": target(i)}) + "\n")


def _csv(count: int) -> str:
    return "text,headline\n" + _lines(count, lambda i: f"article {i},title {i}\n")


DATA_CASES = [
    # (id, file name, content (str or bytes), piece of the one error line)
    ("jsonl-half-numbers", "d.jsonl", _jsonl(40, lambda i: i if i % 2 else f"h{i}"),
     "20 of 40 rows would be skipped (50.0%, more than data.max_skipped_fraction=0.01): 'headline' is a number, "
     "not text: 20, lines 2, 4, 6, 8, 10 and 15 more"),
    ("jsonl-all-numbers", "d.jsonl", _jsonl(40, lambda i: i), "40 of 40 rows would be skipped"),
    ("jsonl-missing-field", "d.jsonl", _jsonl(40) + '{"text": "x"}\n', "no 'headline' field: 1, line 41"),
    ("jsonl-malformed-line", "d.jsonl", _jsonl(5) + '{"text": "a", headline: 1}\n' + _jsonl(40),
     "d.jsonl line 6 is not JSON"),
    ("jsonl-blank-lines-count", "d.jsonl", "\n\n" + _jsonl(3) + '{"text": "a", headline: 1}\n',
     "d.jsonl line 6 is not JSON"),
    ("jsonl-one-array", "d.jsonl", json.dumps([{"text": "a", "headline": "b"}] * 40), "holds a JSON array"),
    ("jsonl-pretty-array", "d.jsonl", json.dumps([{"text": "a", "headline": "b"}] * 40, indent=2),
     "holds a JSON array"),
    ("jsonl-not-an-object", "d.jsonl", _jsonl(3) + "42\n", "d.jsonl line 4 is a JSON int, not an object"),
    ("jsonl-not-utf8", "d.jsonl", _jsonl(3).encode() + '{"text": "caf\xe9", "headline": "x"}\n'.encode("latin-1"),
     "is not UTF-8 text (line 4 holds the byte 0xe9)"),
    ("csv-unbalanced-quote", "d.csv", _csv(10) + 'article,"oops\n' + _csv(30)[14:],
     "d.csv line 12: a quoted field opens here and never closes"),
    ("csv-stray-quote", "d.csv", _csv(10) + 'article,"oops" more\n' + _csv(30)[14:],
     "d.csv line 12: broken CSV quoting"),
    ("csv-extra-field", "d.csv", _csv(10) + "a,b,c\n" + _csv(30)[14:], "d.csv line 12 has 3 fields, the header has 2"),
    ("csv-repeated-header", "d.csv", "text,headline,text\n" + _lines(40, lambda i: f"a{i},h{i},x\n"),
     "the header names 'text' more than once"),
    ("csv-empty-file", "d.csv", "", "d.csv is empty"),
    ("csv-header-only", "d.csv", "text,headline\n", "d.csv has no rows"),
    ("csv-not-utf8", "d.csv", _csv(10).encode() + "caf\xe9,x\n".encode("latin-1"),
     "is not UTF-8 text (line 12 holds the byte 0xe9)"),
    ("csv-not-utf8-header", "d.csv", "caf\xe9,text,headline\n".encode("latin-1"),
     "is not UTF-8 text (line 1 holds the byte 0xe9)"),
]


@pytest.mark.parametrize(("name", "content", "message"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_files_are_refused_with_the_line(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = job(tmp_path / "run", f"data={path.suffix[1:]}", f"data.path={path}", "data.eval_examples=8")
    with pytest.raises(ConfigError) as info:
        preflight(cfg, world_size=1, device_type="cpu")  # cheap checks (header, first record)
        build_data(cfg.data, T5_SHAPE)  # the full strict read, as train.py does before any process group
    line = str(info.value)
    assert message in line and "Fix:" in line and "\n" not in line, line


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(_csv(40).encode("utf-8-sig"))
    cfg = job(tmp_path, "data=csv", f"data.path={path}", "data.eval_examples=8")
    preflight(cfg, world_size=1, device_type="cpu")
    bundle = build_data(cfg.data, T5_SHAPE)
    assert bundle.eval_pairs[-1] == ("article 39", "title 39")
    assert bundle.report == ["data train: 32 rows read from excel.csv, 32 kept, 0 skipped",
                             "data eval: 8 rows read from excel.csv, 8 kept, 0 skipped"]


def _pretrained_folder(tmp_path: Path, weights: bytes | None) -> Path:
    folder = tmp_path / "model"
    T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16).save_pretrained(folder)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.mark.parametrize(("weights", "message"), [
    (None, "holds no weights (none of model.safetensors"),
    (b"not a safetensors file at all", "model.safetensors is not a readable safetensors file"),
    (b"", "model.safetensors is not a readable safetensors file"),
], ids=["config-only", "garbage-weights", "empty-weights"])
def test_broken_pretrained_folders_are_refused_before_the_model_is_built(weights, message, tmp_path):
    folder = _pretrained_folder(tmp_path, weights)
    with pytest.raises(ConfigError) as info:
        preflight(job(tmp_path / "run", f"model.pretrained={folder}"), world_size=1, device_type="cpu")
    assert message in str(info.value) and "Fix:" in str(info.value)


TYPED_CASES = [
    Case("train-plus-unknown-key", ["train", "+trainer.foo=1"], 2, "trainer.foo is not a setting"),
    Case("train-missing-model-folder", ["train", "model.pretrained=./models/t5-mine"], 2,
         "the folder does not exist"),
    Case("train-half-numbers-jsonl", ["train", "data=jsonl", "data.path=half.jsonl"], 2,
         "20 of 40 rows would be skipped"),
    Case("plan-negative-gpus", ["plan", "cluster=h100", "cluster.gpus_per_node=-1"], 2,
         "cluster.gpus_per_node=-1 must be >= 0"),
]


@pytest.mark.parametrize("case", TYPED_CASES, ids=[case.id for case in TYPED_CASES])
def test_bad_values_typed_at_the_command_line(case, tmp_path):
    (tmp_path / "half.jsonl").write_text(_jsonl(40, lambda i: i if i % 2 else f"h{i}"))
    run_dir = tmp_path / "run"
    args = case.args + ([f"hydra.run.dir={run_dir}", *FAST] if case.args[:1] == ["train"] else [])
    before = snapshot(tmp_path)
    outcome = fsdp_kit(*args, cwd=tmp_path, env=case.env)
    assert_rejected(outcome, case)
    # Hydra records the composed config (run/.hydra/) and its log before the job starts; nothing else is written.
    written = set(snapshot(tmp_path)) - set(before)
    assert all(path.startswith("run/.hydra/") or path == "run/train.log" for path in written), written


def test_skipped_rows_are_reported_per_split_at_the_start(tmp_path):
    rows = [(f"article {i}", "" if i in (3, 60) else f"title {i}") for i in range(300)]
    (tmp_path / "d.csv").write_text("text,headline\n" + "".join(f"{a},{b}\n" for a, b in rows))
    outcome = fsdp_kit("train", "data=csv", "data.path=d.csv", f"hydra.run.dir={tmp_path / 'run'}", *FAST,
                       "trainer.max_steps=1", "checkpoint.at_end=false", cwd=tmp_path)
    assert outcome.code == 0, outcome.stderr
    # 298 kept: the last 16 are eval (lines 285-301), the two skipped rows (lines 5 and 62) are train's.
    assert "data train: 284 rows read from d.csv, 282 kept, 2 skipped ('headline' is empty: 2, lines 5, 62)" \
        in outcome.stdout
    assert "data eval: 16 rows read from d.csv, 16 kept, 0 skipped" in outcome.stdout


class _Recall(torch.nn.Module):
    """A perfectly learned seq2seq task: for each source it generates the target exactly as it was trained on
    it (the token ids the data layer gave it, cut to data.max_target_len), or with ``wrong`` a different one."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], wrong: bool = False) -> None:
        super().__init__()
        self.config, self.answers, self.wrong = T5_SHAPE, answers, wrong

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 **_: object) -> torch.Tensor:
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            answer = self.answers[tuple(i for i, m in zip(ids, mask) if m)]
            answer = [answer[1], *answer[1:]] if self.wrong else answer
            rows.append([self.config.decoder_start_token_id, *answer][: max_new_tokens + 1])
        width = max(map(len, rows))
        return torch.tensor([row + [self.config.pad_token_id] * (width - len(row)) for row in rows])


@pytest.mark.parametrize(("wrong", "expected"), [(False, 1.0), (True, 0.0)], ids=["learned", "wrong"])
def test_exact_match_compares_with_the_target_as_trained(wrong, expected, tmp_path):
    from fsdp_kit.distributed import DistEnv
    from fsdp_kit.metrics.report import Reporter
    from fsdp_kit.training.evaluator import Evaluator

    path = tmp_path / "long.csv"
    path.write_text("text,headline\n" + _lines(40, lambda i: f"article {i},a headline longer than eight bytes {i}\n"))
    cfg = job(tmp_path, "data=csv", f"data.path={path}", "data.eval_examples=8", "data.max_target_len=8")
    data = build_data(cfg.data, T5_SHAPE)
    assert all(len(target) > cfg.data.max_target_len for _, target in data.eval_pairs)  # all cut in training
    answers = {tuple(data.eval[i]["source"]): data.eval[i]["target"] for i in range(len(data.eval))}
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"))
    reporter = Reporter(tmp_path, cfg.metrics, cfg.trainer.max_steps, enabled=False)
    evaluator = Evaluator(_Recall(answers, wrong), data, cfg.trainer, env, reporter)
    assert evaluator.exact_match() == expected


# -- checkpoints and run dirs (issue #13) -----------------------------------------------------------------------
# Each case prepares the folder, runs the command, and checks the one error line and that nothing changed (the run
# dir checks run in a Hydra callback before Hydra writes .hydra/ and train.log).

def _fake_checkpoint(folder: Path) -> Path:
    """Enough of a checkpoint for the checks that run before any shard is read."""
    folder.mkdir(parents=True)
    (folder / "fsdp_kit.json").write_text("{}")
    (folder / ".metadata").write_bytes(b"")
    return folder


def test_export_onto_a_file_is_refused(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_1")
    (tmp_path / "weights.bin").write_bytes(b"keep me")
    before = snapshot(tmp_path)
    for out, message in (("weights.bin", "weights.bin is a file"), ("weights.bin/hf", "which is a file")):
        assert_rejected(fsdp_kit("export", str(checkpoint), out, cwd=tmp_path),
                        Case(f"export-{out}", [], 2, message))
    assert snapshot(tmp_path) == before


def test_train_into_a_run_dir_whose_checkpoints_is_a_file_is_refused_up_front(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")
    before = snapshot(run_dir)
    outcome = fsdp_kit("train", f"hydra.run.dir={run_dir}", *FAST, cwd=tmp_path)
    assert_rejected(outcome, Case("checkpoints-is-a-file", [], 2, "checkpoints is a file, not a folder"))
    assert snapshot(run_dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_into_a_read_only_run_dir_is_refused_up_front(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints").chmod(0o555)
    try:
        outcome = fsdp_kit("train", f"hydra.run.dir={run_dir}", *FAST, cwd=tmp_path)
    finally:
        (run_dir / "checkpoints").chmod(0o755)
    assert_rejected(outcome, Case("read-only-checkpoints", [], 2, "is not writable"))


def test_a_second_writer_of_a_run_dir_is_refused(tmp_path):
    import json
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with subprocess.Popen(["sleep", "120"]) as holder:
        try:
            (run_dir / ".fsdp_kit.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
            before = snapshot(run_dir)
            outcome = fsdp_kit("train", f"hydra.run.dir={run_dir}", *FAST, cwd=tmp_path)
        finally:
            holder.kill()
    assert_rejected(outcome, Case("second-writer", [], 2, f"is in use by another run (pid {holder.pid}"))
    assert snapshot(run_dir) == before


def test_resume_from_a_folder_without_its_marker_is_refused(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path / "old" / "checkpoints" / "step_3")
    (checkpoint / "fsdp_kit.json").unlink()
    before = snapshot(tmp_path / "old")
    outcome = fsdp_kit("train", f"hydra.run.dir={tmp_path / 'run'}", f"checkpoint.resume={checkpoint}", *FAST,
                       cwd=tmp_path)
    assert_rejected(outcome, Case("resume-no-marker", [], 2, "fsdp_kit.json is missing"))
    assert snapshot(tmp_path / "old") == before


# --- wt-bench: the batch search, `fsdp-kit bench` and the acceptance command -----------------------------------
BENCH_CASES = [
    Case("train-batch-size-auto", ["train", "trainer.batch_size=auto"], 2, "trainer.auto_batch=true"),
    Case("plan-batch-size-auto", ["plan", "cluster=h100", "trainer.batch_size=auto"], 2, "trainer.auto_batch=true"),
    Case("auto-batch-max-zero", ["plan", "cluster=h100", "trainer.auto_batch_max=0"], 2, "trainer.auto_batch_max=0"),
    Case("bench-unknown-lever", ["bench", "--levers", "bf16,fp8"], 2, "unknown lever 'fp8'"),
    Case("bench-one-step", ["bench", "--steps", "1"], 2, "--steps 1"),
    Case("bench-missing-reference", ["bench", "--reference", "no/such.json"], 2, "--reference no/such.json"),
    Case("bench-bad-override", ["bench", "--levers", "ac", "precision=bf61"], 2, "bf61"),
]


@pytest.mark.parametrize("case", BENCH_CASES, ids=[case.id for case in BENCH_CASES])
def test_bench_and_batch_search_mistakes_are_refused_with_one_line(case, tmp_path):
    args = case.args + ([f"hydra.run.dir={tmp_path / 'run'}", *FAST] if case.args[:1] == ["train"] else [])
    before = snapshot(tmp_path)
    assert_rejected(fsdp_kit(*args, cwd=tmp_path, env=case.env), case)
    assert snapshot(tmp_path) == before


def test_acceptance_command_refuses_an_unknown_argument(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "run.sh"
    result = subprocess.run([str(script), "--fast"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert_rejected(Outcome(result.returncode, result.stdout, result.stderr),
                    Case("run-sh-unknown", ["--fast"], 2, "unknown argument '--fast'"))
    assert snapshot(tmp_path) == {}


# --- wt-review: a new user's pass over README after the merge ---------------------------------------------------
REVIEW_CASES = [
    Case("train-config-dir-without-folder", ["train", "--config-dir"], 2, "--config-dir names no folder"),
    Case("train-missing-config-dir", ["train", "--config-dir", "no/such/dir"], 2, "--config-dir no/such/dir"),
]


@pytest.mark.parametrize("case", REVIEW_CASES, ids=[case.id for case in REVIEW_CASES])
def test_review_train_options_are_refused_with_one_line(case, tmp_path):
    before = snapshot(tmp_path)
    # --config-dir last: without its folder it must not be dropped in silence (that trained the defaults)
    args = [case.args[0], f"hydra.run.dir={tmp_path / 'run'}", *FAST, *case.args[1:]]
    assert_rejected(fsdp_kit(*args, cwd=tmp_path), case)
    assert snapshot(tmp_path) == before


def test_module_entry_point_refuses_batch_size_auto_with_one_line(tmp_path):
    """README's `python -m fsdp_kit.train` path says what `fsdp-kit train` says, not Hydra's type mismatch."""
    result = subprocess.run([sys.executable, "-m", "fsdp_kit.train", "trainer.batch_size=auto",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert_rejected(Outcome(result.returncode, result.stdout, result.stderr),
                    Case("module-batch-size-auto", [], 2, "trainer.auto_batch=true"))
    assert snapshot(tmp_path) == {}


def _finished_run(folder: Path, lr: float) -> Path:
    """A run dir as the trainer leaves it (metrics.jsonl and resolved_config.yaml), without training."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "tokens_per_s": 10.0}\n')
    (folder / "resolved_config.yaml").write_text(f"optim:\n  lr: {lr}\n")
    return folder


def test_compare_labels_one_run_by_its_path(tmp_path):
    run = _finished_run(tmp_path / "run", 1e-3)
    outcome = fsdp_kit("compare", "--no-plot", str(run), cwd=tmp_path)
    assert outcome.code == 0, outcome.stderr
    assert f"| {run.resolve()} |" in outcome.stdout and "//" not in outcome.stdout


def test_compare_output_that_cannot_be_written_is_one_line(tmp_path):
    run = _finished_run(tmp_path / "run", 1e-3)
    (tmp_path / "taken").mkdir()
    before = snapshot(tmp_path)
    assert_rejected(fsdp_kit("compare", "--no-plot", "-o", "taken", str(run), cwd=tmp_path),
                    Case("compare-output-is-a-folder", [], 2, "could not write taken"))
    assert snapshot(tmp_path) == before
    written = fsdp_kit("compare", "--no-plot", "-o", "new/table.md", str(run), cwd=tmp_path)
    assert written.code == 0 and "| run |" in (tmp_path / "new" / "table.md").read_text(), written.stderr


def test_top_level_help_has_no_markup():
    from fsdp_kit.cli import build_parser

    assert "``" not in build_parser().format_help()


def test_resume_with_another_model_leaves_the_run_dir_as_it_was(tmp_path):
    """The shape check ran after resolved_config.yaml was rewritten: the run dir then described the refused
    model. (Hydra's own .hydra/ and train.log are rewritten by any launch into the folder.)"""
    run_dir = tmp_path / "run"
    trained = fsdp_kit("train", f"hydra.run.dir={run_dir}", *FAST, cwd=tmp_path)
    assert trained.code == 0, trained.stderr

    def state() -> dict[str, str]:
        return {name: digest for name, digest in snapshot(run_dir).items()
                if not name.startswith(".hydra") and name != "train.log"}

    before = state()
    assert "resolved_config.yaml" in before and any(name.startswith("checkpoints/") for name in before)
    outcome = fsdp_kit("train", f"hydra.run.dir={run_dir}", *FAST, "trainer.max_steps=3",
                       "model.hf_config.d_ff=256", cwd=tmp_path)
    assert_rejected(outcome, Case("resume-another-model", [], 2, "saved from a different model"))
    assert state() == before


def test_a_failing_sinfo_is_one_error_line(tmp_path):
    """sinfo's stderr is several lines (DNS, config, fatal); the error carried all of them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sinfo = bin_dir / "sinfo"  # the Slurm client of a machine whose controller is unreachable
    sinfo.write_text("#!/bin/sh\necho 'sinfo: error: fetch_config: DNS SRV lookup failed' >&2\n"
                     "echo 'sinfo: fatal: Could not establish a configuration source' >&2\nexit 1\n")
    sinfo.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    outcome = fsdp_kit("slurm", "cluster=p4d", "slurm.partition=train", cwd=tmp_path, env=env)
    assert_rejected(outcome, Case("slurm-sinfo-fails", [], 2, "sinfo: fatal: Could not establish"))
    assert outcome.stderr.count("\n") == 1, outcome.stderr


# --- wt-config: config files, secrets and the planner's command line (issue #21 §2-§6) ---------------------------
TOKEN = "hf_" + "Zq7" * 12  # a stand-in HF token: it must reach no file fsdp_kit writes


def _config_dir(tmp_path: Path) -> Path:
    """A user's config folder: a model file with a shipped preset's name (t5_tiny with d_ff 320, not 512) and an
    experiment that reads the token from the environment, as README's Slurm setup line would."""
    folder = tmp_path / "mine"
    (folder / "model").mkdir(parents=True)
    (folder / "experiment").mkdir()
    shipped = Path(__file__).resolve().parent.parent / "fsdp_kit" / "configs" / "model" / "t5_tiny.yaml"
    (folder / "model" / "t5_tiny.yaml").write_text(shipped.read_text().replace("d_ff: 512", "d_ff: 320"))
    (folder / "experiment" / "token.yaml").write_text(
        "# @package _global_\nslurm:\n  setup: \"export HF_TOKEN=${oc.env:HF_TOKEN}; source .venv/bin/activate\"\n"
        "  output_root: ${oc.env:SCRATCH,outputs}/slurm\n")
    return folder


def test_no_secret_is_written_out(tmp_path):
    """#21 §3: ${oc.env:HF_TOKEN} in a config stays a reference in every file written: the sbatch file (a shell
    reference, read on the node), resolved_config.yaml, Hydra's .hydra/ and W&B's offline run."""
    folder = _config_dir(tmp_path)
    env = {"HF_TOKEN": TOKEN, "SCRATCH": str(tmp_path / "scratch"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           **{name: str(tmp_path / "wandb_home") for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}}
    rendered = fsdp_kit("slurm", "--config-dir", str(folder), "experiment=token", "cluster=p4d", "-o", "job.sbatch",
                        cwd=tmp_path, env=env)
    assert rendered.code == 0, rendered.stderr
    sbatch = (tmp_path / "job.sbatch").read_text()
    assert "SETUP='export HF_TOKEN=\"${HF_TOKEN}\"; source .venv/bin/activate'" in sbatch
    assert 'OUTPUT_ROOT="${SCRATCH-outputs}"/slurm' in sbatch
    trained = fsdp_kit("train", "--config-dir", str(folder), "experiment=token", f"hydra.run.dir={tmp_path / 'run'}",
                       *FAST, "trainer.max_steps=1", "checkpoint.at_end=false", "metrics.wandb=true",
                       "metrics.wandb_project=fsdp-kit-test", cwd=tmp_path, env=env)
    assert trained.code == 0, trained.stderr
    assert "HF_TOKEN=${oc.env:HF_TOKEN}" in (tmp_path / "run" / "resolved_config.yaml").read_text()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb")), "W&B wrote its offline run"
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked and TOKEN not in trained.stdout + rendered.stdout, f"the token was written to {leaked}"


def test_a_config_dir_file_with_a_preset_name_wins_and_is_named(tmp_path):
    """#21 §2: DIR/model/t5_tiny.yaml and DIR/cluster/h100.yaml win over the shipped presets, in plan and in the job
    an sbatch file runs (its overrides given to `python -m fsdp_kit.train`, as the file does), and the output
    says which file each group came from."""
    folder = _config_dir(tmp_path)
    (folder / "cluster").mkdir()
    (folder / "cluster" / "h100.yaml").write_text("name: h100\ngpus_per_node: 1\ngpu: MY-H100\ngpu_memory_gb: 40\n"
                                                   "peak_tflops: 500\n")
    planned = fsdp_kit("plan", "cluster=h100", "--config-dir", str(folder), cwd=tmp_path)
    assert planned.code == 0, planned.stderr
    text = " ".join(planned.stdout.split())
    assert "1 x MY-H100 (40 GB)" in text and f"cluster=h100 ({folder / 'cluster' / 'h100.yaml'})" in text
    assert f"model=t5_tiny ({folder / 'model' / 't5_tiny.yaml'}), precision=fp32 (shipped)" in text
    rendered = fsdp_kit("slurm", "--no-local-checks", "--config-dir", str(folder), "-o", "job.sbatch", cwd=tmp_path)
    assert rendered.code == 0, rendered.stderr
    script = 'eval "$(grep ^OVERRIDES= job.sbatch)"; printf "%s\\n" "${OVERRIDES[@]}"'
    overrides = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                               check=True).stdout.splitlines()
    job = subprocess.run([sys.executable, "-m", "fsdp_kit.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}",
                          *FAST, "trainer.max_steps=1", "checkpoint.at_end=false"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    assert job.returncode == 0, job.stderr
    assert "t5_tiny 0.8M params" in job.stdout, job.stdout  # d_ff 320: the user's file (the shipped one is 1.0M)
    assert f"configs: model=t5_tiny ({folder / 'model' / 't5_tiny.yaml'})" in " ".join(job.stdout.split())


def _bomb(levels: int = 9) -> str:
    """Nested YAML aliases: a few hundred bytes that expand to 9**levels strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefghi", "bcdefghij"[:levels - 1]):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


BAD_FILES = [
    ("alias-bomb", "cluster/boom.yaml", _bomb(), "boom.yaml line 1: YAML anchors and aliases"),
    ("python-tag", "cluster/tag.yaml", 'name: tag\ngpu: !!python/object/apply:os.system ["touch pwned"]\n',
     "tag.yaml line 2: the YAML tag tag:yaml.org,2002:python/object/apply:os.system is not accepted"),
    ("syntax-error", "model/t5_tiny.yaml", "name: t5_tiny\narch: t5\nhf_config:\n  d_model: 128\n   d_ff: 3\n",
     "t5_tiny.yaml line 5 is not valid YAML: mapping values are not allowed here"),
]


@pytest.mark.parametrize(("name", "content", "message"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_yaml_in_a_config_dir_is_one_line_naming_file_and_line(name, content, message, tmp_path):
    """#21 §4, §5: a YAML bomb hung plan, slurm and train; tags and syntax errors gave 80-100 lines."""
    (tmp_path / "mine" / name).parent.mkdir(parents=True)
    (tmp_path / "mine" / name).write_text(content)
    chosen = name.removesuffix(".yaml").replace("/", "=")  # the file is used, e.g. cluster=boom
    before = snapshot(tmp_path)
    for command in (["plan", "cluster=h100", chosen], ["slurm", "--no-local-checks", chosen], ["train", *FAST, chosen]):
        outcome = fsdp_kit(*command, "--config-dir", "mine", cwd=tmp_path, timeout=60)
        assert_rejected(outcome, Case(f"{name}-{command[0]}", [], 2, message))
    assert snapshot(tmp_path) == before and not (tmp_path / "pwned").exists()


CONFIG_CASES = [
    Case("cluster-file-wrong-type", ["plan", "--config-dir", "mine", "cluster=bad"], 2,
         "Value 'eight' of type 'str' could not be converted to Integer (key cluster.gpus_per_node)"),
    Case("plan-gpt2-default-lengths", ["plan", "model=gpt2_tiny", "cluster=h100"], 2,
         "the planner plans at 512/128 source/target tokens unless told otherwise. Fix: pass --source-len/"
         "--target-len within its 256 positions, e.g. --source-len 224 --target-len 32"),
    Case("plan-negative-budget", ["plan", "cluster=h100", "ac=auto", "ac.budget_gb=-1"], 2,
         "ac.budget_gb=-1.0 must be > 0"),
    Case("plan-negative-prefetch", ["plan", "cluster=h100", "sharding.prefetch=-2"], 2,
         "sharding.prefetch=-2 must be >= 0"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[case.id for case in CONFIG_CASES])
def test_config_and_planner_mistakes_are_one_line(case, tmp_path):
    (tmp_path / "mine" / "cluster").mkdir(parents=True)
    (tmp_path / "mine" / "cluster" / "bad.yaml").write_text("name: bad\ngpus_per_node: eight\n")
    before = snapshot(tmp_path)
    assert_rejected(fsdp_kit(*case.args, cwd=tmp_path), case)
    assert snapshot(tmp_path) == before


def test_overrides_are_accepted_after_flags(tmp_path):
    """#21 §6: `plan cluster=h100 --source-len 64 model=...` was 'unrecognized arguments', in slurm and compare too."""
    planned = fsdp_kit("plan", "cluster=h100", "--source-len", "64", "--target-len", "16", "model=gpt2_tiny",
                       cwd=tmp_path)
    assert planned.code == 0 and "gpt2_tiny" in planned.stdout and "source/target 64/16" in planned.stdout, \
        planned.stderr
    rendered = fsdp_kit("slurm", "cluster=p4d", "--no-local-checks", "cluster.nodes=2", "-o", "job.sbatch",
                        "slurm.partition=gpu", cwd=tmp_path)
    assert rendered.code == 0, rendered.stderr
    assert "--nodes=2" in (tmp_path / "job.sbatch").read_text() and "--partition=gpu" in (
        tmp_path / "job.sbatch").read_text()
    run = _finished_run(tmp_path / "run", 1e-3)
    compared = fsdp_kit("compare", "--no-plot", str(run), "-o", "table.md", cwd=tmp_path)
    assert compared.code == 0 and "| run |" in (tmp_path / "table.md").read_text(), compared.stderr


def test_plan_says_what_is_a_cap_and_what_is_assumed(tmp_path):
    """#21 §6: "largest batch 4096" is the search's cap; the network bandwidths it prices are stated as assumed."""
    capped = fsdp_kit("plan", "model=t5_tiny", "cluster=h100", "cluster.gpus_per_node=2", "--source-len", "64",
                      "--target-len", "16", cwd=tmp_path)
    text = " ".join(capped.stdout.split())
    assert capped.code == 0, capped.stderr
    assert "largest batch that fits: 4096 (the planner's cap: it tries no batch above 4096" in text
    assert "GPU-to-GPU bandwidth in a node assumed 100 GB/s (set cluster.intra_node_gbps)" in text
    nodes = fsdp_kit("plan", "model=t5_tiny", "cluster=h100", "cluster.nodes=2", "cluster.intra_node_gbps=450",
                     cwd=tmp_path)
    text = " ".join(nodes.stdout.split())
    assert "network between nodes assumed 100 Gb/s (set cluster.inter_node_gbps)" in text, nodes.stderr
    assert "GPU-to-GPU bandwidth in a node assumed" not in text  # given, so not assumed
