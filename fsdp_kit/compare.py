"""``fsdp-kit compare RUN_DIR...``: several runs side by side, e.g. the points of a Hydra sweep.

One markdown table (final train loss, eval loss, exact match, TFLOPS per GPU, tokens/s, peak memory, and the
config keys whose values differ between the runs, read from each run's resolved_config.yaml) and one PNG (loss
and throughput over steps, from each run's metrics.jsonl). A folder that is not itself a run (a multirun folder)
stands for every run below it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsdp_kit.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "resolved_config.yaml"
# Differ between any two runs and say nothing about the recipe.
_IGNORED_KEYS = ("run_dir",)


@dataclass
class Run:
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

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
        found = [path] if (path / METRICS_FILE).is_file() else sorted(
            (p.parent for p in path.rglob(METRICS_FILE)), key=_natural)
        if not found:
            raise ConfigError(f"{given} holds no {METRICS_FILE} (neither a run dir nor a folder of runs)",
                              "pass the run dir a training wrote, or a Hydra multirun folder")
        runs += [run for run in found if run not in runs]
    return runs


def _natural(path: Path) -> list[Any]:
    """Sweep points 2 before 10."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def load_run(path: Path) -> Run:
    run = Run(path)
    for number, line in enumerate((path / METRICS_FILE).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path / METRICS_FILE} line {number} is not JSON ({err.msg})",
                              "pass run dirs written by fsdp_kit (a run still writing may end mid-line)") from err
        if record.get("summary"):
            run.summary = record
        elif "eval_loss" in record:
            run.evals.append(record)
        elif "loss" in record:
            run.train.append(record)
    config_file = path / CONFIG_FILE
    if config_file.is_file():
        run.config = _flatten(yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
    return run


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
    header = ["run", "final loss", "eval loss", "exact match", "TFLOPS/GPU", "tokens/s", "peak mem GB", *diffs]
    rows = []
    for name, run in zip(_names(runs), runs):
        final_loss = run.train[-1]["loss"] if run.train else None
        rows.append([name, _cell(final_loss), _cell(run.latest("eval_loss", run.evals)),
                     _cell(run.latest("exact_match", run.evals)), _cell(run.latest("tflops_per_gpu", run.train)),
                     _cell(run.latest("tokens_per_s", run.train)), _cell(run.latest("peak_mem_gb", run.train)),
                     *(_cell(run.config.get(key)) for key in diffs)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], out: Path) -> Path:
    """Loss (train solid, eval dashed) and tokens/s over steps, one color per run."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run, color in zip(_names(runs), runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        loss_ax.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=color, label=name)
        if run.evals:
            loss_ax.plot([r["step"] for r in run.evals], [r["eval_loss"] for r in run.evals], color=color,
                         linestyle="--", marker="o", markersize=3, label=f"{name} (eval)")
        speed_ax.plot([r["step"] for r in run.train], [r.get("tokens_per_s") for r in run.train], color=color,
                      label=name)
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


def compare(paths: list[str | Path], plot_path: str | Path | None) -> tuple[str, Path | None]:
    """The markdown table for the runs at ``paths`` and the PNG written to ``plot_path`` (None: no plot)."""
    runs = [load_run(path) for path in find_runs(paths)]
    return markdown_table(runs), plot(runs, Path(plot_path)) if plot_path else None
