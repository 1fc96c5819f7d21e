"""Measurements on record: the JSON that GPU runs leave under benchmarks/results/, read into one shape.

A record is a JSON object with (at least) ``model``, ``precision``, ``ac``, ``batch``, ``device`` and any of
``tflops`` (model TFLOPS per GPU, recompute not counted), ``tokens_per_s`` (per GPU), ``peak_mem_gb`` (the
peak of ``torch.cuda.max_memory_allocated``, 1e9 bytes), ``peak_reserved_gb``; optionally ``wrap``,
``sharding``, ``optim``, ``compile``, ``source_len``, ``target_len``, ``world_size``. A file holds one record, a
list of records, or ``{"records": [...]}`` (what ``fsdp-kit bench`` and benchmarks/gpu/run.sh write to
benchmarks/results/<device>/). Older files are read too: ``benchmarks/throughput.py``'s (``tflops_per_gpu``) and
the design probe's ``{"runs": [...]}`` (``overrides``, ``peak_gib``, ``cluster``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "results"
_GIB = 2**30


def _from_probe(run: dict[str, Any]) -> dict[str, Any]:
    fields = dict(item.split("=", 1) for item in run.get("overrides", []) if "=" in item)
    record = {
        "model": fields.get("model"),
        "precision": fields.get("precision", "fp32"),
        "ac": fields.get("ac", "none"),
        "wrap": fields.get("wrap", "transformer"),
        "optim": fields.get("optim", "adamw"),
        "compile": bool(run.get("compiled")),
        "batch": run.get("batch"),
        "tflops": run.get("tflops"),
        "tokens_per_s": run.get("tokens_per_s"),
        "device": run.get("cluster"),
        "source_len": 512,
        "target_len": 128,
        "label": run.get("label"),
        "overrides": run.get("overrides", []),
        "cluster": run.get("cluster"),
    }
    if run.get("peak_gib") is not None:
        record["peak_mem_gb"] = run["peak_gib"] * _GIB / 1e9
    return record


def _normalize(item: dict[str, Any]) -> dict[str, Any] | None:
    if not isinstance(item, dict) or "model" not in item:
        return None
    record = dict(item)
    if record.get("tflops") is None and record.get("tflops_per_gpu") is not None:
        record["tflops"] = record["tflops_per_gpu"]
    record.setdefault("compile", False)
    return record


def load_records(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every measurement under ``results`` (recursively), each with ``source`` (its file, relative)."""
    records: list[dict[str, Any]] = []
    for path in sorted(results.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            items = [_from_probe(run) for run in data["runs"] if isinstance(run, dict)]
        elif isinstance(data, dict) and isinstance(data.get("records"), list):
            items = data["records"]
        elif isinstance(data, list):
            items = data
        else:
            items = [data]
        for item in items:
            record = _normalize(item)
            if record is not None:
                record["source"] = str(
                    path.relative_to(results.parent.parent) if results.parent.parent in path.parents else path
                )
                records.append(record)
    return records
