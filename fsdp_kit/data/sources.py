"""Where (source, target) text pairs come from: the built-in task, CSV/JSONL files, or a HF dataset.

Files are parsed strictly (broken CSV quoting, a row with the wrong number of fields, a line that is not JSON:
an error naming the line), and no row is dropped in silence: every skipped row is counted by reason, reported
per split at the start of the run, and more than ``data.max_skipped_fraction`` of them stops the run.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fsdp_kit.data import builtin
from fsdp_kit.data.config import DataConfig
from fsdp_kit.errors import ConfigError

Pair = tuple[str, str]
_SHOWN = 5
"""Positions listed per kind of skip (the count is always complete)."""


@dataclass
class SplitReport:
    """What happened to one split's rows: read, kept, and skipped by reason with the first positions."""

    split: str
    origin: str
    unit: str
    read: int
    kept: int
    skipped: dict[str, list[int]]

    def line(self) -> str:
        count = sum(map(len, self.skipped.values()))
        text = f"data {self.split}: {self.read} rows read from {self.origin}, {self.kept} kept, {count} skipped"
        if count:
            text += (
                " ("
                + "; ".join(
                    f"{reason}: {len(where)}, {_positions(self.unit, where)}" for reason, where in self.skipped.items()
                )
                + ")"
            )
        return text


@dataclass
class Rows:
    """Rows read from a file or dataset, with the position (file line or dataset row) of each kept and
    skipped one, so that skips can be reported per split and by line."""

    origin: str
    unit: str
    pairs: list[Pair] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def add(self, position: int, source: Any, target: Any, cfg: DataConfig) -> None:
        reason = _skip_reason(source, cfg.source_column) or _skip_reason(target, cfg.target_column)
        if reason is None:
            self.pairs.append((source, target))
            self.positions.append(position)
        else:
            self.skipped.setdefault(reason, []).append(position)

    @property
    def read(self) -> int:
        return len(self.pairs) + sum(map(len, self.skipped.values()))

    def split(self, eval_examples: int) -> tuple[list[Pair], list[Pair], list[SplitReport]]:
        """(train, eval, reports): eval is the last ``eval_examples`` kept rows; a skipped row belongs to the
        split whose rows surround it."""
        boundary = self.positions[-eval_examples]
        reports = []
        for name, keep in (("train", lambda p: p < boundary), ("eval", lambda p: p >= boundary)):
            skipped = {
                reason: mine for reason, where in self.skipped.items() if (mine := [p for p in where if keep(p)])
            }
            kept = len(self.pairs) - eval_examples if name == "train" else eval_examples
            reports.append(
                SplitReport(name, self.origin, self.unit, kept + sum(map(len, skipped.values())), kept, skipped)
            )
        return self.pairs[:-eval_examples], self.pairs[-eval_examples:], reports

    def check_skips(self, limit: float) -> None:
        count = self.read - len(self.pairs)
        if count > limit * self.read:
            reasons = "; ".join(
                f"{reason}: {len(where)}, {_positions(self.unit, where)}" for reason, where in self.skipped.items()
            )
            raise ConfigError(
                f"{self.origin}: {count} of {self.read} rows would be skipped ({count / self.read:.1%}, more than "
                f"data.max_skipped_fraction={limit}): {reasons}",
                "fix those rows (source and target must be non-empty text; write numbers as JSON strings), "
                "point data.source_column/data.target_column at text columns, or raise data.max_skipped_fraction",
            )


@dataclass
class Loaded:
    """Train and eval pairs, and one report line per split (``report`` is empty for generated data)."""

    train: list[Pair]
    eval: list[Pair]
    report: list[str] = field(default_factory=list)


def _positions(unit: str, where: list[int]) -> str:
    shown = ", ".join(map(str, where[:_SHOWN]))
    more = f" and {len(where) - _SHOWN} more" if len(where) > _SHOWN else ""
    return f"{unit}s {shown}{more}" if len(where) > 1 else f"{unit} {shown}"


def _skip_reason(value: Any, column: str) -> str | None:
    if value is _MISSING:
        return f"no {column!r} field"
    if value is None:
        return f"{column!r} is null"
    if isinstance(value, bool):
        return f"{column!r} is true/false, not text"
    if isinstance(value, (int, float)):
        return f"{column!r} is a number, not text"
    if not isinstance(value, str):
        return f"{column!r} is a JSON {'list' if isinstance(value, list) else 'object'}, not text"
    if not value.strip():
        return f"{column!r} is empty"
    return None


_MISSING = object()
"""A JSON object without the column (told apart from an explicit null)."""


def check_source(cfg: DataConfig) -> None:
    """Cheap checks (file exists, readable, columns present) that run before any process group or model."""
    if cfg.source in ("csv", "jsonl"):
        if not cfg.path:
            raise ConfigError(f"data={cfg.source} needs a file", f"pass data.path=/path/to/file.{cfg.source}")
        path = Path(cfg.path)
        if not path.is_file():
            raise ConfigError(
                f"data.path={cfg.path!r} does not exist or is not a file",
                "pass the path of an existing file (relative paths start where you launch)",
            )
        columns = _csv_header(path) if cfg.source == "csv" else _jsonl_columns(path)
        _check_columns(path, columns, cfg)
    if cfg.source == "hf":
        if not cfg.hf_name:
            raise ConfigError("data=hf needs a dataset name", "pass data.hf_name=<hub dataset name>")
        try:
            import datasets  # noqa: F401
        except ImportError as err:
            raise ConfigError("data=hf needs the datasets package", "pip install 'fsdp_kit[hf]'") from err


def load_pairs(cfg: DataConfig) -> Loaded:
    """(train, eval) pairs and the per-split report; eval is the last ``eval_examples`` rows of a file, or
    fresh built-in examples. Raises ConfigError when more than ``max_skipped_fraction`` of the rows are skipped."""
    if cfg.source == "builtin":
        train = builtin.pairs(cfg.seed, 0, cfg.num_examples)
        return Loaded(train, builtin.pairs(cfg.seed, cfg.num_examples, cfg.eval_examples))
    if cfg.source == "csv":
        rows = _read_csv(Path(str(cfg.path)), cfg)  # check_source refused a missing path
    elif cfg.source == "jsonl":
        rows = _read_jsonl(Path(str(cfg.path)), cfg)
    else:
        rows = _read_hf(cfg)
    if rows.read == 0:
        raise ConfigError(
            f"{rows.origin} has no rows", "use a file with a header and rows (csv) or one JSON object per line (jsonl)"
        )
    rows.check_skips(cfg.max_skipped_fraction)
    if len(rows.pairs) <= cfg.eval_examples:
        raise ConfigError(
            f"{rows.origin} has {len(rows.pairs)} usable rows, not more than data.eval_examples={cfg.eval_examples}",
            "lower data.eval_examples or use a larger file",
        )
    train, evaluation, reports = rows.split(cfg.eval_examples)
    return Loaded(train, evaluation, [report.line() for report in reports])


def _check_columns(path: Path, columns: list[str], cfg: DataConfig) -> None:
    missing = [c for c in (cfg.source_column, cfg.target_column) if c not in columns]
    if missing:
        raise ConfigError(
            f"{path} has no column {', '.join(map(repr, missing))} (it has {', '.join(map(repr, columns))})",
            "set data.source_column=... and data.target_column=... to two of its columns",
        )


def _open(path: Path, newline: str | None = None) -> TextIO:
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
    return path.open(newline=newline, encoding="utf-8-sig")


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ConfigError:
    """The line holding the first byte that is not UTF-8 (the decoder only knows its offset in a buffer)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):  # noqa: B007 (number is used after the loop)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                byte = raw[bad.start]
                break
        else:
            number, byte = 0, err.object[err.start]
    return ConfigError(
        f"{path} is not UTF-8 text (line {number} holds the byte 0x{byte:02x})",
        f"save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > utf8.{path.suffix.lstrip('.')}",
    )


def _csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of every non-blank record, the header first, parsed strictly."""
    csv.field_size_limit(sys.maxsize)  # wikihow articles exceed csv's 128 KiB default
    start = 1
    try:
        with _open(path, newline="") as handle:
            reader = csv.reader(handle, strict=True)
            for record in reader:
                first, start = start, reader.line_num + 1
                if record:
                    yield first, record
    except csv.Error as err:
        if "end of data" in str(err):  # a quoted field still open at the end of the file
            problem = f"{path} line {start}: a quoted field opens here and never closes"
        else:
            problem = f"{path} line {start}: broken CSV quoting ({err})"
        raise ConfigError(
            problem, 'balance the quotes on that line (a quote inside a quoted field is written twice: "")'
        ) from err
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _csv_header(path: Path) -> list[str]:
    header = next(_csv_records(path), None)
    if header is None:
        raise ConfigError(f"{path} is empty", "use a CSV file with a header line naming its columns")
    _, names = header
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"{path}: the header names {', '.join(map(repr, repeated))} more than once",
            "give every column its own name",
        )
    return names


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) of every non-blank line."""
    try:
        with _open(path) as handle:
            first = True
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if first and line.lstrip().startswith("["):
                    raise ConfigError(
                        f"{path} holds a JSON array, not JSON Lines (one object per line)",
                        f"convert it, e.g. jq -c '.[]' {path} > {path.stem}.lines.jsonl",
                    )
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(
                        f"{path} line {number} is not JSON ({err.msg}, column {err.colno})",
                        "write one JSON object per line (JSON Lines)",
                    ) from err
                if not isinstance(record, dict):
                    raise ConfigError(
                        f"{path} line {number} is a JSON {type(record).__name__}, not an object",
                        "write one JSON object per line (JSON Lines)",
                    )
                first = False
                yield number, record
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _jsonl_columns(path: Path) -> list[str]:
    first = next(_jsonl_records(path), None)
    if first is None:
        raise ConfigError(f"{path} is empty", "write one JSON object per line")
    return list(first[1])


def _read_csv(path: Path, cfg: DataConfig) -> Rows:
    names = _csv_header(path)
    _check_columns(path, names, cfg)
    source, target = names.index(cfg.source_column), names.index(cfg.target_column)
    rows = Rows(path.name, "line")
    records = _csv_records(path)
    next(records)  # the header
    for number, record in records:
        if len(record) != len(names):
            raise ConfigError(
                f"{path} line {number} has {len(record)} fields, the header has {len(names)}",
                "quote fields that hold a comma, and look for an unbalanced quote on or before that line",
            )
        rows.add(number, record[source], record[target], cfg)
    return rows


def _read_jsonl(path: Path, cfg: DataConfig) -> Rows:
    rows = Rows(path.name, "line")
    for number, record in _jsonl_records(path):
        rows.add(number, record.get(cfg.source_column, _MISSING), record.get(cfg.target_column, _MISSING), cfg)
    return rows


def _read_hf(cfg: DataConfig) -> Rows:
    import datasets  # the [hf] extra

    try:
        table = datasets.load_dataset(cfg.hf_name, cfg.hf_config_name, split=cfg.hf_split)
    except Exception as err:  # datasets raises many types for network, name and split problems
        raise ConfigError(
            f"data.hf_name={cfg.hf_name!r} could not be loaded ({type(err).__name__}: {err})",
            "check the name/split and network, or download it and use data=jsonl",
        ) from err
    for column in (cfg.source_column, cfg.target_column):
        if column not in table.column_names:
            raise ConfigError(
                f"{cfg.hf_name} has no column {column!r} (it has {table.column_names})",
                "set data.source_column / data.target_column",
            )
    rows = Rows(f"{cfg.hf_name}[{cfg.hf_split}]", "row")
    for index, (source, target) in enumerate(zip(table[cfg.source_column], table[cfg.target_column])):
        rows.add(index, source, target, cfg)
    return rows
