"""What is reported and where."""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_kit.checks import check_fields
from fsdp_kit.errors import ConfigError


@dataclass
class MetricsConfig:
    peak_tflops: float | None = None
    """Dense peak TFLOPS of one device for MFU; null looks it up (unknown devices report no MFU)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <run_dir>/tensorboard (needs the [tensorboard] extra)."""
    progress: bool = True
    """Live progress bar on rank 0 (a line per log step when the output is not a terminal)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the [wandb] extra; the API key comes from wandb's own login or
    environment, never from this config). WANDB_MODE=offline writes the run under <run_dir>/wandb only."""
    wandb_project: str = "fsdp_kit"
    """wandb: the project the run goes to."""
    wandb_name: str | None = None
    """wandb: the run's display name; null uses the run dir's path. The run id is derived from the run dir, so a
    requeued job continues the same wandb run."""

    def check(self, prefix: str = "metrics.") -> None:
        """Each setting finite and in its range, the wandb project named (``prefix``: where this config
        sits in the job)."""
        check_fields(self, prefix, {"peak_tflops": ">0"})
        if not self.wandb_project.strip():
            raise ConfigError(f"{prefix}wandb_project is empty", f"pass {prefix}wandb_project=<your project>")
