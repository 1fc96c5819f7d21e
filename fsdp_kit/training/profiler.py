"""``trainer.profile=true``: a torch.profiler trace of a window of training steps, and on CUDA a memory snapshot
of the same window, written to ``<run_dir>/profile/``.

The window follows ``torch.profiler.schedule``: ``profile_wait`` steps untouched, ``profile_warmup`` steps traced
and discarded, ``profile_active`` steps recorded. Each rank writes its own files (``trace_rank{R}_step{N}.json``:
Chrome trace JSON for https://ui.perfetto.dev or TensorBoard's profiler; ``memory_rank{R}.pickle``: for
https://pytorch.org/memory_viz). Off (``profile=false``) it costs nothing: every method returns at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile, schedule

from fsdp_kit.torch_private import dump_cuda_memory_history, start_cuda_memory_history
from fsdp_kit.training.config import TrainerConfig

PROFILE_DIR = "profile"
# Allocation events kept by the CUDA caching allocator's recorder: enough for many steps of a large model.
_MEMORY_HISTORY_ENTRIES = 200_000


class StepProfiler:
    """Context manager around the loop; ``step()`` at every step boundary advances the profiler's schedule."""

    def __init__(self, cfg: TrainerConfig, run_dir: str | Path, rank: int, device_type: str, info: Any = print) -> None:
        self.enabled = cfg.profile
        self.cfg, self.rank, self.device_type, self._info = cfg, rank, device_type, info
        self.out = Path(run_dir) / PROFILE_DIR
        self.traces: list[Path] = []
        self.memory_snapshot: Path | None = None
        self._profiler: profile | None = None
        self._steps = 0  # steps of this process: the schedule counts these, a resumed run included
        self._last_step = 0
        self._recording_memory = False

    def plan(self, first_step: int, max_steps: int) -> None:
        """This process trains steps ``first_step + 1 .. max_steps`` (fewer than max_steps after a resume): say at
        start-up which of them are traced and where, or that none are and no trace will be written."""
        if not self.enabled:
            return
        cfg, left = self.cfg, max_steps - first_step
        skipped = cfg.profile_wait + cfg.profile_warmup
        window = (
            f"trainer.profile_wait={cfg.profile_wait} + profile_warmup={cfg.profile_warmup} + "
            f"profile_active={cfg.profile_active} steps"
        )
        if left <= skipped:  # not one active step: the profiler would never hand over a trace
            self.enabled = False
            self._info(
                f"profile: no trace will be written: this run has {left} step(s) left (resumed at step "
                f"{first_step} of {max_steps}), fewer than the window needs ({window}); lower profile_wait/"
                "profile_warmup or raise trainer.max_steps"
            )
            return
        start, end = first_step + skipped + 1, min(first_step + self._window_end(), max_steps)
        cut = f" (the run ends inside the window of {window})" if end - start + 1 < cfg.profile_active else ""
        self._info(f"profile: steps {start}-{end} are traced into {self.out}/trace_rank{{R}}_step{end}.json{cut}")

    def __enter__(self) -> StepProfiler:
        if not self.enabled:
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device_type == "cuda" else [])
        self._profiler = profile(
            activities=activities,
            schedule=schedule(
                wait=self.cfg.profile_wait, warmup=self.cfg.profile_warmup, active=self.cfg.profile_active, repeat=1
            ),
            on_trace_ready=self._write_trace,
            record_shapes=True,
            profile_memory=True,
        )
        self._profiler.__enter__()
        if self.device_type != "cuda":
            self._info(
                f"profile: CUDA memory snapshot skipped (it needs a CUDA device; this run is on {self.device_type})"
            )
        elif self.cfg.profile_wait == 0:
            self._start_memory_history()
        return self

    def step(self, step: int) -> None:
        """Training step ``step`` (the run's global count, which names the trace file) finished."""
        if self._profiler is None:
            return
        self._steps += 1
        self._last_step = step
        self._profiler.step()
        if self.device_type == "cuda":
            # The snapshot covers the profiler's window: start recording as warmup begins, dump after the last
            # active step (the allocator keeps the history of the whole window, freed blocks included).
            if self._steps == self.cfg.profile_wait:
                self._start_memory_history()
            elif self._steps == self._window_end() and self._recording_memory:
                self._dump_memory()

    def __exit__(self, *exc: object) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(*exc)  # a window cut short (preemption) still writes what it recorded
        self._profiler = None
        if self._recording_memory:
            self._dump_memory()

    def _window_end(self) -> int:
        return self.cfg.profile_wait + self.cfg.profile_warmup + self.cfg.profile_active

    def _write_trace(self, prof: profile) -> None:
        path = self.out / f"trace_rank{self.rank}_step{self._last_step}.json"
        prof.export_chrome_trace(str(path))
        self.traces.append(path)
        self._info(f"profile: wrote {path} (open it in https://ui.perfetto.dev)")

    def _start_memory_history(self) -> None:
        start_cuda_memory_history(_MEMORY_HISTORY_ENTRIES)
        self._recording_memory = True

    def _dump_memory(self) -> None:
        path = self.out / f"memory_rank{self.rank}.pickle"
        dump_cuda_memory_history(path)
        self._recording_memory = False
        self.memory_snapshot = path
        self._info(f"profile: wrote {path} (drop it on https://pytorch.org/memory_viz)")
