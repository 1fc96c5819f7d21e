"""``trainer.auto_batch``: the largest per-rank batch that fits, found with real forward/backward passes.

The search starts from the planner's estimate for this device (``fsdp_kit.plan``), doubles while probes fit and
halves while they do not, then bisects. Each probe runs one forward and backward at full sequence lengths; an
out-of-memory error is caught in this process, everything the probe held is freed (gradients, unsharded FSDP
parameters, the allocator's cache) and the next, smaller batch is tried: no restart. Every rank takes every
decision together (a probe fits only if it fits on all ranks), so all ranks end on the same batch. Before the
probes each GPU rank holds back the memory it has beyond the least free on any rank, so that ranks run out at the
same point: a rank that failed alone would leave the others waiting inside a collective of the forward pass.

Optimizer states that do not exist yet (a fresh run; a resumed run loads them later) are stood in for by an
allocation of their size held during the probes, so that the batch found still fits once they exist.

The search leaves the run as it found it: weights, buffers and optimizer state are not stepped (no optimizer
step, buffers restored), the RNG streams are restored, gradients are dropped and the training data's position is
untouched (probe batches are read by index, not from the loader).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from fsdp_kit.config import TrainConfig
from fsdp_kit.data.loader import DataBundle
from fsdp_kit.data.packing import as_packed
from fsdp_kit.distributed import DistEnv
from fsdp_kit.errors import ConfigError
from fsdp_kit.models.objective import token_loss
from fsdp_kit.optim.anyprecision import AnyPrecisionAdamW
from fsdp_kit.plan import make_plan
from fsdp_kit.plan.memory import GB
from fsdp_kit.policies.apply import reshard_all
from fsdp_kit.torch_private import finish_fsdp_iteration

__all__ = ["BatchSearch", "find_batch_size", "planner_start", "search_batch_size", "upper_bound"]


@dataclass
class BatchSearch:
    """What the search found and how: every probe (batch, fitted on all ranks) in order."""

    batch_size: int
    start: int
    start_source: str
    upper_bound: int
    probes: list[tuple[int, bool]] = field(default_factory=list)
    seconds: float = 0.0

    def record(self) -> dict[str, object]:
        """The metrics.jsonl line."""
        return {
            "step": 0,
            "event": "auto_batch",
            "batch_size": self.batch_size,
            "start": self.start,
            "start_source": self.start_source,
            "upper_bound": self.upper_bound,
            "probes": [list(p) for p in self.probes],
            "seconds": self.seconds,
        }

    def message(self) -> str:
        tried = ", ".join(f"{b}{'' if ok else ' (out of memory)'}" for b, ok in self.probes)
        return (
            f"trainer.auto_batch: batch {self.batch_size} per rank (started at {self.start} from "
            f"{self.start_source}, bound {self.upper_bound}; tried {tried}; {self.seconds:.1f} s)"
        )


def upper_bound(auto_batch_max: int, eval_examples: int, world_size: int) -> int:
    """The largest batch the search may pick: the configured bound, and one global batch of held-out data."""
    return max(1, min(auto_batch_max, eval_examples // world_size))


def search_batch_size(
    model: nn.Module,
    optimizer: Optimizer,
    data: DataBundle,
    device: torch.device,
    world_size: int,
    start: int,
    bound: int,
    start_source: str = "trainer.batch_size",
    probe: Callable[[int], None] | None = None,
) -> BatchSearch:
    """The largest batch in [1, bound] whose forward/backward fits on every rank, starting the search at ``start``.

    ``probe`` replaces the forward/backward of one batch (tests); it raises ``torch.OutOfMemoryError`` when the
    batch does not fit. Raises ConfigError when not even batch 1 fits.
    """
    began = time.perf_counter()
    run_probe = probe or _Prober(model, data, device)
    saved = _Snapshot.take(model, device)
    ballast = _optimizer_state_ballast(optimizer, device)
    leveller = _level_free_memory(device, world_size)
    result = BatchSearch(batch_size=0, start=start, start_source=start_source, upper_bound=bound)
    try:
        fits_max, fails_min = 0, bound + 1  # largest batch known to fit, smallest known not to
        batch = min(max(start, 1), bound)
        while fails_min - fits_max > 1:
            fits = _agree(_fits(run_probe, batch, model, device), device, world_size)
            result.probes.append((batch, fits))
            if fits:
                fits_max = batch
            else:
                fails_min = batch
            if fails_min > bound:  # nothing failed yet: grow
                batch = min(2 * fits_max, bound)
            elif fits_max == 0:  # nothing fitted yet: shrink
                batch = max(fails_min // 2, 1)
            else:
                batch = (fits_max + fails_min) // 2
    finally:
        del ballast, leveller
        saved.restore(model, device)
        _free(model, device)
    result.batch_size, result.seconds = fits_max, time.perf_counter() - began
    if fits_max == 0:
        raise ConfigError(
            "trainer.auto_batch: not even batch 1 fits in this device's memory",
            "use ac=full, shard over more devices, precision=bf16_pure with optim=anyprecision, "
            "sharding.cpu_offload=true, or shorter data.max_source_len/max_target_len",
        )
    return result


class _Prober:
    """One forward and backward at ``batch`` examples of full length, through the training objective."""

    def __init__(self, model: nn.Module, data: DataBundle, device: torch.device) -> None:
        self.model, self.data, self.device = model, data, device
        lengths = (data.cfg.max_source_len, data.cfg.max_target_len)
        # Full lengths whatever data.pad_to_max_length says: the search is for the worst batch.
        self.collate = dataclasses.replace(data.collate, fixed_lengths=lengths)
        self._examples: list = []

    def __call__(self, batch: int) -> None:
        size = len(self.data.train)
        while len(self._examples) < min(batch, size):
            self._examples.append(self.data.train[len(self._examples)])
        examples = [self._examples[i % len(self._examples)] for i in range(batch)]
        collated = self.collate(examples)
        if self.data.cfg.packing:  # packed rows are full: the same shapes, through the packed forward
            collated = as_packed(collated)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in collated.items()}
        self.model.train()
        loss_sum, _ = token_loss(self.model, inputs)
        loss_sum.backward()


def _fits(probe: Callable[[int], None], batch: int, model: nn.Module, device: torch.device) -> bool:
    try:
        probe(batch)
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    # Outside the except block: the exception's traceback (and the frames holding activations) is gone by now.
    if not fits:
        _reset_fsdp(model)
    _free(model, device)
    return fits


def _reset_fsdp(model: nn.Module) -> None:
    """Finish the FSDP iteration an out-of-memory error interrupted. FSDP2 closes each iteration in a callback at
    the end of backward; without it the next backward never queues that callback again, its groups stay in their
    backward states and every later step computes wrong gradients (the test of this module catches that). The
    callback is private API (fsdp_kit.torch_private): it reduces any gradients computed, reshards and resets."""
    finish_fsdp_iteration(model)


def _free(model: nn.Module, device: torch.device) -> None:
    """Drop what a probe left: gradients, parameters an interrupted forward/backward left unsharded, cached
    blocks (so the next probe sees the memory as free, not fragmented)."""
    model.zero_grad(set_to_none=True)
    reshard_all(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _agree(fits: bool, device: torch.device, world_size: int) -> bool:
    """A batch fits only if it fits on every rank: all ranks take the same branch and end on the same batch."""
    if world_size == 1:
        return fits
    flag = torch.tensor(int(fits), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _level_free_memory(device: torch.device, world_size: int) -> torch.Tensor | None:
    """Hold the difference between this rank's free GPU memory and the least any rank has. With equal shapes on
    every rank, all ranks then run out of memory at the same allocation: a rank that failed alone would leave the
    others waiting forever inside an FSDP collective of the probe."""
    if device.type != "cuda" or world_size == 1:
        return None
    torch.cuda.empty_cache()
    free = torch.tensor(torch.cuda.mem_get_info(device)[0], dtype=torch.int64, device=device)
    least = free.clone()
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    extra = int((free - least).item())
    return torch.empty(extra, dtype=torch.uint8, device=device) if extra > 0 else None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _optimizer_state_ballast(optimizer: Optimizer, device: torch.device) -> torch.Tensor | None:
    """An allocation the size of the optimizer states that do not exist yet on ``device``, or None."""
    total = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            local = _local(param)
            if optimizer.state.get(param) or local.device.type != device.type:  # exists, or offloaded to CPU
                continue
            if isinstance(optimizer, AnyPrecisionAdamW):
                dtypes = [group["momentum_dtype"], group["variance_dtype"]]
                if group["use_kahan_summation"]:
                    dtypes.append(group["compensation_buffer_dtype"])
                total += sum(local.numel() * d.itemsize for d in dtypes)
            else:  # the Adam family: two states in the parameter's dtype
                total += 2 * local.numel() * local.element_size()
    return torch.empty(total, dtype=torch.uint8, device=device) if total else None


@dataclass
class _Snapshot:
    """RNG streams and buffers (a forward in train mode may update running statistics)."""

    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    buffers: list[torch.Tensor]
    training: bool

    @classmethod
    def take(cls, model: nn.Module, device: torch.device) -> _Snapshot:
        cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        buffers = [_local(b).detach().clone() for b in model.buffers()]
        return cls(torch.get_rng_state(), cuda_rng, buffers, model.training)

    def restore(self, model: nn.Module, device: torch.device) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), self.buffers, strict=True):
                _local(buffer).copy_(saved)
        model.train(self.training)


def planner_start(job: TrainConfig, env: DistEnv) -> tuple[int, str]:
    """Where the search starts: the planner's largest batch for this GPU's memory, or trainer.batch_size where the
    planner has nothing to plan for (CPU)."""
    if env.device_type != "cuda":
        return job.trainer.batch_size, "trainer.batch_size (no GPU memory to plan for)"
    memory_gb = torch.cuda.get_device_properties(env.device).total_memory / GB
    cluster = dataclasses.replace(
        job.cluster,
        nodes=max(env.world_size // env.local_world_size, 1),
        gpus_per_node=env.local_world_size,
        gpu_memory_gb=memory_gb,
    )
    plan = make_plan(dataclasses.replace(job, cluster=cluster))
    return max(plan.max_batch, 1), f"the planner ({memory_gb:.0f} GB per GPU)"


def find_batch_size(
    job: TrainConfig, model: nn.Module, optimizer: Optimizer, data: DataBundle, env: DistEnv
) -> BatchSearch:
    """Run the search for ``job`` (trainer.auto_batch=true) on this rank; the batch found is the result's
    ``batch_size`` (``job`` is not changed)."""
    start, source = planner_start(job, env)
    bound = upper_bound(job.trainer.auto_batch_max, job.data.eval_examples, env.world_size)
    found = search_batch_size(model, optimizer, data, env.device, env.world_size, start, bound, source)
    if job.trainer.compile:
        # The probes' several batch sizes made dynamo compile shape-generic kernels; training runs one shape,
        # so compile afresh for it (what a run at a fixed batch would have).
        torch.compiler.reset()
    return found
