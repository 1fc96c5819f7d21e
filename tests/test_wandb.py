"""Weights & Biases as an optional sink, in offline mode (nothing leaves the machine)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from helpers import job, run_ranks, train

from fsdp_kit.errors import ConfigError
from fsdp_kit.preflight import check_packages

pytest.importorskip("wandb", reason="the [wandb] extra is not installed")

SECRET = "fsdpkit" + "0" * 33  # a stand-in API key: it must not end up in any file of the run


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file (wandb 0.31 has no Python reader: its log is
    LevelDB's log format, 32 KiB blocks of chunks [crc32, length u16, type u8], after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, block = path.read_bytes(), [], b"", 32 * 1024
    assert data[:3] == b":W&", data[:7]
    offset = 7
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4:offset + 7])
        if kind == 0 and length == 0:
            break
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))  # keep wandb out of $HOME
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    return tmp_path / "run"


def test_wandb_offline_run_gets_the_metrics_and_the_resolved_config(offline):
    run_ranks(train, 1, job(offline, "trainer.max_steps=3", "trainer.eval_every=2", "metrics.wandb=true",
                            "metrics.wandb_project=fsdp-kit-test"))
    runs = list((offline / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((offline / "wandb").iterdir())
    records = wandb_records(next(runs[0].glob("run-fsdp-kit-*.wandb")))
    by_kind: dict[str, list] = {}
    for record in records:
        by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)
    config = {_key(item): json.loads(item.value_json) for item in by_kind["run"][0].run.config.update}
    assert config["trainer"]["max_steps"] == 3 and config["optim"]["lr"] > 0
    assert config["precision"]["name"] == "fp32", "options as plain strings"
    jsonl = [json.loads(line) for line in (offline / "metrics.jsonl").read_text().splitlines()]
    history = [{_key(item): json.loads(item.value_json) for item in r.history.item} for r in by_kind["history"]]
    train_losses = {row["_step"]: row["loss"] for row in history if "loss" in row}
    assert train_losses == {r["step"]: r["loss"] for r in jsonl if "loss" in r and "summary" not in r}
    assert {row["_step"]: row["eval_loss"] for row in history if "eval_loss" in row} == {
        r["step"]: r["eval_loss"] for r in jsonl if "eval_loss" in r and "summary" not in r}
    summary = {_key(item): json.loads(item.value_json) for r in by_kind["summary"] for item in r.summary.update}
    assert summary["summary/final_step"] == 3 and summary["summary/tokens_per_s"] == jsonl[-1]["tokens_per_s"]
    leaked = [p for p in offline.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def test_preflight_refuses_wandb_without_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the extra looks like
    with pytest.raises(ConfigError, match=r"metrics.wandb=true needs the wandb package.*fsdp_kit\[wandb\]"):
        check_packages(job(tmp_path, "metrics.wandb=true"))
