"""``fsdp-kit compare RUN_DIR...``: several runs side by side, e.g. the points of a Hydra sweep.

One markdown table (final train loss, eval loss, exact match, TFLOPS per GPU, tokens/s, peak memory, and the
config keys whose values differ between the runs, read from each run's resolved_config.yaml) and one PNG (loss
and throughput over steps, from each run's metrics.jsonl). A folder that is not itself a run (a multirun folder)
stands for every run below it.

A run is reported as finished only when its metrics.jsonl ends with a summary written after its last training
step, at ``trainer.max_steps``; its rates are that summary's (the run's measured windows), never one log
window's. A killed or still-running run shows "step N of M, unfinished" and no rates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsdp_kit.errors import ConfigError, first_line

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "resolved_config.yaml"
# Differ between any two runs and say nothing about the recipe.
_IGNORED_KEYS = ("run_dir",)


@dataclass
class Run:
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    # a summary record written after the last training record: the run's last session ended normally
    ended: bool = False

    @property
    def last_step(self) -> int | None:
        return self.train[-1]["step"] if self.train else None

    @property
    def max_steps(self) -> int | None:
        value = self.config.get("trainer.max_steps")
        return value if isinstance(value, int) else None

    @property
    def finished(self) -> bool:
        """Its last session wrote its summary, at max_steps (when the config says what that is)."""
        if not self.ended:
            return False
        final = self.summaries[-1].get("final_step")
        return self.max_steps is None or not isinstance(final, int) or final >= self.max_steps

    @property
    def summary(self) -> dict[str, Any]:
        """The summary of the session that trained: a run started again after it had finished trains nothing and
        writes a summary without rates, which must not hide the one that measured the run."""
        if not self.finished:
            return {}
        return next((s for s in reversed(self.summaries) if s.get("steps_measured")), self.summaries[-1])

    def status(self) -> str:
        if self.finished:
            return "finished"
        of = f" of {self.max_steps}" if self.max_steps is not None else ""
        return f"step {self.last_step or 0}{of}, unfinished"

    def latest(self, key: str, records: list[dict[str, Any]]) -> Any:
        """The summary's value of ``key``, else its last value in ``records``."""
        if self.summary.get(key) is not None:
            return self.summary[key]
        return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run dirs (folders holding metrics.jsonl) for ``paths``: each a run dir or a folder of them."""
    runs: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise ConfigError(f"{given} is not a folder", "pass run dirs (holding metrics.jsonl) or a multirun folder")
        found = (
            [path]
            if (path / METRICS_FILE).is_file()
            else sorted((p.parent for p in path.rglob(METRICS_FILE)), key=_natural)
        )
        if not found:
            raise ConfigError(
                f"{given} holds no {METRICS_FILE} (neither a run dir nor a folder of runs)",
                "pass the run dir a training wrote, or a Hydra multirun folder",
            )
        runs += [run for run in found if run not in runs]
    return runs


def _natural(path: Path) -> list[Any]:
    """Sweep points 2 before 10."""
    return [int(part) if part.isdigit() else part for part in path.parts]


_NOT_A_RUN_FILE = "pass run dirs written by fsdp_kit"


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{file} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})",
            f"{_NOT_A_RUN_FILE}; this file was damaged or replaced",
        ) from err
    except OSError as err:
        raise ConfigError(f"{file} cannot be read ({err.strerror})", f"{_NOT_A_RUN_FILE} that you can read") from err


def _record(file: Path, number: int, line: str) -> dict[str, Any] | None:
    """Line ``number`` of a metrics.jsonl as a record (None for a blank line); one error line for anything else."""
    if not line.strip():
        return None
    where = f"{file} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{where} is not JSON ({err.msg})", f"{_NOT_A_RUN_FILE} (a run still writing may end mid-line)"
        ) from err
    if not isinstance(record, dict):
        raise ConfigError(f"{where} is JSON but not a record ({type(record).__name__}, not an object)", _NOT_A_RUN_FILE)
    if (
        not record.get("summary")
        and ("loss" in record or "eval_loss" in record)
        and not isinstance(record.get("step"), int)
    ):
        raise ConfigError(f"{where} has a loss but no integer step", _NOT_A_RUN_FILE)
    return record


def load_run(path: Path) -> Run:
    run = Run(path)
    file = path / METRICS_FILE
    for number, line in enumerate(_read_text(file).splitlines(), 1):
        record = _record(file, number, line)
        if record is None:
            continue
        if record.get("summary"):
            run.summaries.append(record)
            run.ended = True
        elif "eval_loss" in record:
            run.evals.append(record)
        elif "loss" in record:
            run.train.append(record)
            run.ended = False
    config_file = path / CONFIG_FILE
    if config_file.is_file():
        run.config = _flatten(_load_config(config_file))
    return run


def _load_config(file: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(_read_text(file))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{file} is not valid YAML{where} ({getattr(err, 'problem', None) or first_line(err)})",
            "restore the file the run wrote, or delete it to compare without config keys",
        ) from err
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{file} holds a {type(tree).__name__}, not a config",
            "restore the file the run wrote, or delete it to compare without config keys",
        )
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values are not the same in every run (a key missing from a run counts as differing)."""
    keys = sorted({key for run in runs for key in run.config} - set(_IGNORED_KEYS))
    missing = object()
    return [key for key in keys if len({repr(run.config.get(key, missing)) for run in runs}) > 1]


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.{digits}g}"
    return str(value).replace("|", "\\|")


def _names(runs: list[Run]) -> list[str]:
    """Each run's path, shortened by the folders all of them share."""
    parts = [run.path.resolve().parts for run in runs]
    common = 0
    while len(runs) > 1 and all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [str(Path(*p[common:])) for p in parts]  # Path, not "/".join: a root part is "/" itself


def markdown_table(runs: list[Run]) -> str:
    diffs = differing_keys(runs)
    header = [
        "run",
        "status",
        "final loss",
        "eval loss",
        "exact match",
        "TFLOPS/GPU",
        "tokens/s",
        "peak mem GB",
        *diffs,
    ]
    rows = []
    for name, run in zip(_names(runs), runs):
        final_loss = run.train[-1]["loss"] if run.train else None
        # rates over the whole run come from its summary only: one log window's are not the run's
        rates = [_cell(run.summary.get(key)) for key in ("tflops_per_gpu", "tokens_per_s", "peak_mem_gb")]
        rows.append(
            [
                name,
                run.status(),
                _cell(final_loss),
                _cell(run.latest("eval_loss", run.evals)),
                _cell(run.latest("exact_match", run.evals)),
                *rates,
                *(_cell(run.config.get(key)) for key in diffs),
            ]
        )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], out: Path) -> Path:
    """Loss (train solid, eval dashed) and tokens/s over steps, one color per run."""
    import matplotlib  # matplotlib takes a second to import, only plots need it

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run, color in zip(_names(runs), runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        name = name if run.finished else f"{name} ({run.status()})"
        loss_ax.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=color, label=name)
        if run.evals:
            loss_ax.plot(
                [r["step"] for r in run.evals],
                [r["eval_loss"] for r in run.evals],
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{name} (eval)",
            )
        speed_ax.plot(
            [r["step"] for r in run.train], [r.get("tokens_per_s") for r in run.train], color=color, label=name
        )
    loss_ax.set(xlabel="step", ylabel="loss", title="loss (train solid, eval dashed)")
    speed_ax.set(xlabel="step", ylabel="tokens/s", title="throughput (all ranks)")
    for axis in (loss_ax, speed_ax):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def check_plot_path(plot_path: str | Path) -> None:
    """A file name whose extension matplotlib can write (checked before any run is read)."""
    from matplotlib.backend_bases import FigureCanvasBase  # matplotlib only when a plot is asked for

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(plot_path).suffix.lstrip(".").lower()
    if suffix not in formats:
        said = f"extension .{suffix}" if suffix else "no extension"
        raise ConfigError(
            f"--plot {plot_path} has {said}, which matplotlib cannot write",
            f"name the plot e.g. compare.png (one of {', '.join('.' + f for f in sorted(formats))})",
        )


def compare(paths: list[str | Path], plot_path: str | Path | None) -> tuple[str, Path | None]:
    """The markdown table for the runs at ``paths`` and the PNG written to ``plot_path`` (None: no plot)."""
    if plot_path:
        check_plot_path(plot_path)
    runs = [load_run(path) for path in find_runs(paths)]
    return markdown_table(runs), plot(runs, Path(plot_path)) if plot_path else None
