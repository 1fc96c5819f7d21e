"""The training loop's settings: batch, steps, schedule, cadence."""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_kit.checks import check_fields
from fsdp_kit.errors import ConfigError
from fsdp_kit.options import Option


class LrSchedule(Option):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


# What turns a setting off, where a user might try 0 for that.
_OFF_HINTS = {
    "clip_grad_norm": " (null turns clipping off)",
    "max_new_tokens": " (null uses data.max_target_len)",
}


@dataclass
class TrainerConfig:
    batch_size: int = 16
    """Per-GPU (per-rank) micro-batch size. With ``auto_batch=true``: where the search starts when the planner
    cannot estimate (CPU, or no GPU memory to plan for); the search replaces it with the batch it finds."""
    auto_batch: bool = False
    """Find the largest per-rank batch that fits before training (real forward/backward passes with in-process
    out-of-memory recovery, starting from the planner's estimate, all ranks taking the smallest). This is what
    the issue spells ``trainer.batch_size=auto``: OmegaConf 2.3 cannot type a field as int-or-"auto"."""
    auto_batch_max: int = 512
    """Upper bound of the batch search (also bounded by data.eval_examples / world size). On CPU, where running
    out of memory is not an error torch can recover from, the search stops here."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_accum_no_sync: bool = False
    """With grad_accum > 1: reduce-scatter gradients once per step instead of after every micro-batch (FSDP2's
    set_requires_gradient_sync). Less communication; each rank holds the whole unsharded gradient meanwhile
    (the planner counts it)."""
    max_steps: int = 500
    """Optimizer steps to train."""
    lr_schedule: LrSchedule = LrSchedule.cosine
    """cosine | linear | constant, each after a linear warmup."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """cosine: final learning rate as a fraction of the peak."""
    clip_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    log_every: int = 10
    """Log metrics every this many steps."""
    eval_every: int = 100
    """Evaluate the held-out loss every this many steps (and at the end); 0 only at the end."""
    eval_batches: int = 8
    """Batches per rank for the eval loss."""
    eval_generate: bool = True
    """At the end, generate on the held-out split and report exact-match accuracy."""
    max_new_tokens: int | None = None
    """Generation length limit; null uses data.max_target_len."""
    compile: bool = False
    """torch.compile each transformer layer."""
    seed: int = 0
    """Seed for weight init and dropout."""
    profile: bool = False
    """Trace a window of steps with torch.profiler into <run_dir>/profile/ (Chrome trace JSON per rank, for
    Perfetto or TensorBoard) and, on CUDA, record a memory snapshot of the same window (for pytorch.org/memory_viz)."""
    profile_wait: int = 2
    """profile: steps (of this process, counted from its first step) before the profiler starts warming up."""
    profile_warmup: int = 1
    """profile: steps traced but discarded (the profiler's own start-up cost)."""
    profile_active: int = 2
    """profile: steps recorded into the trace."""
    hang_timeout_s: float = 0.0
    """Hang watchdog: a training step running longer than max(this, hang_factor x the recent median step time)
    (a process's first step: hang_factor x this) makes every rank dump its Python stacks (stderr and
    <run_dir>/hang/) and exit with the requeue code 75, so Slurm restarts the job from its last checkpoint;
    0 disables the watchdog. Eval and checkpoint saves are not timed."""
    hang_factor: float = 10.0
    """Hang watchdog: how many times the median of the recent steps a step may take (above hang_timeout_s)."""
    max_nonfinite_steps: int = 5
    """Stop with an error after this many optimizer steps in a row with a non-finite loss or gradient norm
    (each such step is skipped, never checkpointed). The guard reads one flag per step on the host; 0 turns it
    off (no such read, and a blow-up is neither skipped nor stopped)."""

    def check(self, prefix: str = "trainer.") -> None:
        """Each setting finite and in its range, and the profile window within the run (``prefix``: where this
        config sits in the job)."""
        check_fields(
            self,
            prefix,
            {
                "batch_size": ">0",
                "grad_accum": ">0",
                "max_steps": ">0",
                "log_every": ">0",
                "eval_batches": ">0",
                "warmup_steps": ">=0",
                "eval_every": ">=0",
                "min_lr_ratio": "[0,1]",
                "clip_grad_norm": ">0",
                "max_new_tokens": ">0",
                "profile_wait": ">=0",
                "profile_warmup": ">=0",
                "profile_active": ">0",
                "hang_timeout_s": ">=0",
                "hang_factor": ">=1",
                "max_nonfinite_steps": ">=0",
                "auto_batch_max": ">0",
            },
            off_hints=_OFF_HINTS,
        )
        window = self.profile_wait + self.profile_warmup + self.profile_active
        if self.profile and window > self.max_steps:
            raise ConfigError(
                f"{prefix}profile: the window (profile_wait={self.profile_wait} + profile_warmup="
                f"{self.profile_warmup} + profile_active={self.profile_active} = {window} steps) is longer than "
                f"{prefix}max_steps={self.max_steps}, so no trace would be written",
                f"lower {prefix}profile_wait/profile_active or raise {prefix}max_steps",
            )
