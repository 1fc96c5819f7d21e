"""The step path never makes the host wait: no ``.item()``/``int(tensor)``/``.cpu()`` outside log steps.

Observed through dispatch (a TorchDispatchMode around ``Trainer.fit``), on real 2-rank gloo training: every
``aten._local_scalar_dense`` (``.item()``, ``int()``, ``bool()`` of a tensor) and every device-to-host copy is
recorded with the trainer's step counter, and none may happen before the only log step.

Two kinds of reads are not the trainer's and happen in a plain FSDP2 loop too, so they are set aside (and
counted, so a change in them shows): torch AdamW reads its per-parameter ``step`` counters, which live on the
host unless ``capturable``; HF's mask helpers check ``attention_mask.all()`` to pick the SDPA fast path.
"""

from __future__ import annotations

import traceback

import torch
from helpers import job, run_ranks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

STEPS = 5
_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
NOT_OURS = ("/torch/optim/", "/transformers/")


class HostSyncCounter(TorchDispatchMode):
    """Records every op that makes the host read a tensor's value, with ``where()`` at that moment."""

    def __init__(self, where) -> None:
        super().__init__()
        self.where = where
        self.events: list[tuple[int, str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SCALAR_READ or (func in _COPIES and self._device_to_host(args, out)):
            stack = traceback.extract_stack()
            ours = [f"{frame.filename.split('fsdp_kit/')[-1]}:{frame.lineno} {frame.name}"
                    for frame in stack if "/fsdp_kit/" in frame.filename]
            library = next((part for part in NOT_OURS for frame in stack if part in frame.filename), None)
            self.events.append((self.where(), str(func), " <- ".join(reversed(ours[-4:])), library))
        return out

    @staticmethod
    def _device_to_host(args, out) -> bool:
        sources = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
        targets = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        return bool(sources and targets)


def _count_syncs(cfg):
    """Rank body: train, counting host syncs by the step they happened in."""
    from fsdp_kit.train import run
    from fsdp_kit.training.trainer import Trainer

    fit = Trainer.fit
    counters = []

    def counted_fit(self):
        with HostSyncCounter(lambda: self.state.step) as counter:
            counters.append(counter)
            return fit(self)

    Trainer.fit = counted_fit
    try:
        run(cfg)
    finally:
        Trainer.fit = fit
    return counters[0].events


def test_no_host_sync_outside_log_steps(tmp_path):
    # One log step, the last: every step before it must run without reading a tensor on the host. Gradient
    # accumulation and clipping (on by default) are on the path too. The non-finite guard (its one read per
    # step is the price of never applying or saving a NaN update) is off here; the next test counts it.
    cfg = job(tmp_path, f"trainer.max_steps={STEPS}", f"trainer.log_every={STEPS}", "trainer.grad_accum=2",
              "trainer.max_nonfinite_steps=0")
    for rank, events in enumerate(run_ranks(_count_syncs, 2, cfg)):
        # Train step s runs while state.step == s - 1; the log of step STEPS (and the final eval) after it.
        # Step 1 is left out: creating the loader iterator (before it) draws its seed with an .item().
        on_step_path = [event for event in events if 1 <= event[0] < STEPS and event[3] is None]
        assert not on_step_path, f"rank {rank} synced on the step path:\n" + "\n".join(map(str, on_step_path))
        # The counter sees syncs where they are allowed, so an empty step path is not a blind spot.
        assert any(event[0] == STEPS and event[3] is None for event in events), f"rank {rank}: blind at the log step"


def test_the_non_finite_guard_reads_one_flag_per_step(tmp_path):
    cfg = job(tmp_path, f"trainer.max_steps={STEPS}", f"trainer.log_every={STEPS}", "trainer.max_nonfinite_steps=3")
    events = run_ranks(_count_syncs, 1, cfg)[0]
    for step in range(1, STEPS):
        reads = [event for event in events if event[0] == step and event[3] is None]
        assert len(reads) == 1, f"step {step + 1}: {len(reads)} host reads\n" + "\n".join(map(str, reads))
