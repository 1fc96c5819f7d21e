"""Where (source, target) text pairs come from: the built-in task, CSV/JSONL files, or a HF dataset."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from fsdp_kit.data import builtin
from fsdp_kit.data.config import DataConfig
from fsdp_kit.errors import ConfigError

Pair = tuple[str, str]


def check_source(cfg: DataConfig) -> None:
    """Cheap checks (file exists, columns present) that run before any process group or model."""
    if cfg.source in ("csv", "jsonl"):
        if not cfg.path:
            raise ConfigError(f"data={cfg.source} needs a file", f"pass data.path=/path/to/file.{cfg.source}")
        path = Path(cfg.path)
        if not path.is_file():
            raise ConfigError(f"data.path={cfg.path!r} does not exist or is not a file",
                              "pass the path of an existing file (relative paths start where you launch)")
        columns = _csv_columns(path) if cfg.source == "csv" else _jsonl_columns(path)
        missing = [c for c in (cfg.source_column, cfg.target_column) if c not in columns]
        if missing:
            raise ConfigError(
                f"{cfg.path} has no column {', '.join(map(repr, missing))} (it has {', '.join(map(repr, columns))})",
                "set data.source_column=... and data.target_column=... to two of its columns")
    if cfg.source == "hf":
        if not cfg.hf_name:
            raise ConfigError("data=hf needs a dataset name", "pass data.hf_name=<hub dataset name>")
        try:
            import datasets  # noqa: F401
        except ImportError as err:
            raise ConfigError("data=hf needs the datasets package", "pip install 'fsdp_kit[hf]'") from err


def load_pairs(cfg: DataConfig) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) pairs; eval is the last ``eval_examples`` rows of a file, or fresh built-in examples."""
    if cfg.source == "builtin":
        train = builtin.pairs(cfg.seed, 0, cfg.num_examples)
        return train, builtin.pairs(cfg.seed, cfg.num_examples, cfg.eval_examples)
    if cfg.source == "csv":
        rows = _read_csv(Path(cfg.path), cfg)
    elif cfg.source == "jsonl":
        rows = _read_jsonl(Path(cfg.path), cfg)
    else:
        rows = _read_hf(cfg)
    if len(rows) <= cfg.eval_examples:
        raise ConfigError(f"{cfg.path or cfg.hf_name} has {len(rows)} usable rows, not more than data.eval_examples="
                          f"{cfg.eval_examples}", "lower data.eval_examples or use a larger file")
    return rows[: -cfg.eval_examples], rows[-cfg.eval_examples:]


def _usable(source: object, target: object) -> bool:
    return isinstance(source, str) and isinstance(target, str) and bool(source.strip()) and bool(target.strip())


def _csv_columns(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


def _jsonl_columns(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    return list(json.loads(line))
                except (json.JSONDecodeError, TypeError) as err:
                    raise ConfigError(f"{path} is not JSON Lines (first line is not a JSON object)",
                                      "write one JSON object per line") from err
    return []


def _read_csv(path: Path, cfg: DataConfig) -> list[Pair]:
    csv.field_size_limit(sys.maxsize)  # wikihow articles exceed csv's 128 KiB default
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return [(row[cfg.source_column], row[cfg.target_column]) for row in reader
                if _usable(row[cfg.source_column], row[cfg.target_column])]


def _read_jsonl(path: Path, cfg: DataConfig) -> list[Pair]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if _usable(record.get(cfg.source_column), record.get(cfg.target_column)):
                    rows.append((record[cfg.source_column], record[cfg.target_column]))
    return rows


def _read_hf(cfg: DataConfig) -> list[Pair]:
    import datasets

    try:
        table = datasets.load_dataset(cfg.hf_name, cfg.hf_config_name, split=cfg.hf_split)
    except Exception as err:  # datasets raises many types for network, name and split problems
        raise ConfigError(f"data.hf_name={cfg.hf_name!r} could not be loaded ({type(err).__name__}: {err})",
                          "check the name/split and network, or download it and use data=jsonl") from err
    for column in (cfg.source_column, cfg.target_column):
        if column not in table.column_names:
            raise ConfigError(f"{cfg.hf_name} has no column {column!r} (it has {table.column_names})",
                              "set data.source_column / data.target_column")
    return [(s, t) for s, t in zip(table[cfg.source_column], table[cfg.target_column]) if _usable(s, t)]
