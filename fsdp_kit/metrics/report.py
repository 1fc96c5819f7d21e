"""Where numbers go: metrics.jsonl, the console (rich), TensorBoard, Weights & Biases. Only the main rank reports."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fsdp_kit.metrics.config import MetricsConfig

Record = dict[str, Any]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


class Reporter:
    """Writes every record to ``<run_dir>/metrics.jsonl`` and shows it; a no-op where ``enabled`` is False."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: MetricsConfig,
        total_steps: int,
        enabled: bool,
        console: Console | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """``config``: the resolved job config (plain values), sent to Weights & Biases as the run's config."""
        self.enabled = enabled
        self.cfg = cfg
        self.total_steps = total_steps
        self.console = console or Console(soft_wrap=True)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._progress: Progress | None = None
        self._task: Any = None
        self._tensorboard: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # the [tensorboard] extra

            self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if cfg.wandb:
            self._wandb = _start_wandb(self.run_dir, cfg, config or {})

    def __enter__(self) -> Reporter:
        if self.enabled and self.cfg.progress and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total_steps, stats="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tensorboard is not None:
            self._tensorboard.close()

    def close(self) -> None:
        """Finish the sinks that outlive the loop (the final eval and the summary come after it)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def note(self, record: Record, message: str) -> None:
        """A one-off event (e.g. the batch size search): a line in metrics.jsonl and one on the console."""
        if self.enabled:
            self._write(record, scalars=False)
            self.console.print(message, highlight=False)

    def warning(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[bold red]warning:[/] {message}", highlight=False)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, record: Record) -> None:
        if not self.enabled:
            return
        self._write(record)
        line = (
            f"loss {_fmt(record['loss'], 4)} | lr {record['lr']:.2e} | {_fmt(record['tokens_per_s'], 0)} tok/s | "
            f"{_fmt(record['tflops_per_gpu'], 2)} TFLOPS/GPU | MFU {_fmt_metric('mfu', record['mfu'])} | "
            f"mem {_fmt(record['peak_mem_gb'], 2)} GB"
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], stats=line)
        elif self.cfg.progress:
            self.console.print(f"step {record['step']}/{self.total_steps} | {line}", highlight=False)

    def eval(self, record: Record) -> None:
        if not self.enabled:
            return
        self._write(record)
        parts = [f"{key} {_fmt(value, 4)}" for key, value in record.items() if key != "step"]
        self.console.print(f"[bold]eval[/bold] step {record['step']} | " + " | ".join(parts), highlight=False)

    def summary(self, record: Record) -> None:
        """The final line of metrics.jsonl (``"summary": true``) and a table on the console."""
        if not self.enabled:
            return
        self._write({**record, "summary": True}, scalars=False)
        if self._wandb is not None:
            # under their own prefix: wandb's summary already holds each logged metric's last value
            self._wandb.summary.update({f"summary/{k}": v for k, v in record.items() if v is not None})
        table = Table(title="fsdp_kit run summary", show_header=False)
        for key, value in record.items():
            table.add_row(key, _fmt_metric(key, value))
        self.console.print(table)

    def _write(self, record: Record, scalars: bool = True) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if not scalars:
            return
        values = {
            key: value
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(values, step=record["step"])


def _start_wandb(run_dir: Path, cfg: MetricsConfig, config: dict[str, Any]) -> Any:
    """A wandb run whose files live in ``run_dir/wandb``. Its id is derived from the run dir, so a requeued job
    (same run dir) continues the same wandb run. The API key stays wandb's business (its login or environment):
    nothing here reads or passes it."""
    import wandb  # the [wandb] extra

    run_id = "fsdp-kit-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.wandb_project,
        name=cfg.wandb_name or str(run_dir),
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config,
    )


# Rates and counts read best as whole numbers; a percentage sign only where there is a value.
_WHOLE_NUMBERS = ("tokens_per_s", "real_tokens_per_s", "samples_per_s", "tokens")


def _fmt_metric(key: str, value: Any) -> str:
    if key == "mfu":
        return "n/a" if value is None else f"{100.0 * value:,.1f}%"
    if key.endswith(_WHOLE_NUMBERS) and isinstance(value, float):
        return _fmt(value, 0)
    return _fmt(value, 4)
