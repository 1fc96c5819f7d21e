"""fsdp_kit.torch_private: one test per private torch API, so a torch upgrade that moves one fails here, loudly."""

from __future__ import annotations

import contextlib
import datetime
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from fsdp_kit import torch_private as tp
from tests.helpers import run_ranks


class _FailingBackward(torch.autograd.Function):
    """Identity forward; its backward raises (as an out-of-memory error in the middle of backward would)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("interrupted backward")


class _Interrupt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FailingBackward.apply(x) if self.armed else x


def _fsdp_checks() -> dict:
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        model = nn.Sequential(nn.Linear(4, 4), _Interrupt(), nn.Linear(4, 2))
        model.load_state_dict({name.replace("1.", "2.", 1) if name.startswith("1.") else name: value
                               for name, value in reference.state_dict().items()})
        fully_shard(model[0], mp_policy=MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32))
        fully_shard(model)
        x = torch.randn(3, 4)
        with contextlib.suppress(RuntimeError):  # the last layer's gradients are computed, the first layer's never
            model(x).sum().backward()
        dtypes = [(str(p.param_dtype), str(p.reduce_dtype)) for p in tp.fsdp_params(model[0])]  # set by forward
        model.zero_grad(set_to_none=True)
        model[1].armed = False
        tp.finish_fsdp_iteration(model)
        model(x).sum().backward()
        reference(x).sum().backward()
        grads_close = all(torch.allclose(p.grad.full_tensor(), r.grad, atol=2e-2)
                          for p, r in zip(model.parameters(), reference.parameters(), strict=True))
        return {"dtypes": dtypes, "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
                "grads_close": grads_close}
    finally:
        dist.destroy_process_group()


def test_fsdp_param_records_and_the_end_of_backward_callback():
    (result,) = run_ranks(_fsdp_checks, 1, timeout=60)
    assert result["dtypes"] == [("torch.bfloat16", "torch.float32")] * 2
    assert result["sharded"] and result["grads_close"]


def test_checkpoint_wrapper_is_unwrapped_and_names_its_parameters_with_the_prefix():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    inner = model[0]
    tp.apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=lambda m: tp.checkpoint_wrapper(m, checkpoint_impl=tp.CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: m is inner)
    assert isinstance(model[0], tp.CheckpointWrapper)
    assert tp.unwrap_checkpointed(model[0]) is inner and tp.unwrap_checkpointed(inner) is inner
    assert [name for name, _ in model.named_parameters()] == [f"0.{tp.CHECKPOINT_WRAPPER_PREFIX}weight",
                                                             f"0.{tp.CHECKPOINT_WRAPPER_PREFIX}bias"]


def test_fake_mode_takes_real_meta_inputs_and_its_cache_can_be_turned_off():
    with tp.fake_mode() as mode:
        out = torch.zeros(2, 3, device="meta") @ torch.zeros(3, 4, device="meta")
    assert isinstance(mode, tp.FakeTensorMode) and out.shape == (2, 4)
    assert tp.fake_mode(cache=False).cache_enabled is False


def test_op_packet_and_schema_and_a_dispatch_mode_sees_each_op():
    seen = []

    class Spy(tp.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    a, b = torch.ones(2, 2), torch.ones(2, 2)
    with Spy():
        torch.mm(a, b)
    assert seen == [torch.ops.aten.mm.default]
    assert tp.op_packet(seen[0]) is torch.ops.aten.mm
    assert [arg.name for arg in tp.op_schema_arguments(torch.ops.aten.add_.Tensor)] == ["self", "other", "alpha"]
    assert tp.op_schema_arguments(torch.ops.aten.add_.Tensor)[0].alias_info.is_write


def test_pytree_flattens_nested_outputs():
    nested = {"a": torch.ones(1), "b": (torch.zeros(2), [torch.ones(3)])}
    assert [t.numel() for t in tp.tree_leaves(nested)] == [1, 2, 3]
    assert len(tp.tree_flatten(nested)[0]) == 3


def test_direct_parameters_and_a_swap_that_leaves_no_trace():
    layer = nn.Linear(2, 2)
    layer.register_parameter("extra", None)
    original = layer.weight
    assert [name for name, _ in tp.direct_parameters(layer)] == ["weight", "bias", "extra"]
    tp.set_parameter(layer, "weight", nn.Parameter(torch.zeros(2, 2)))
    assert layer.weight.sum() == 0
    tp.set_parameter(layer, "weight", original)
    assert layer.weight is original and [n for n, _ in layer.named_parameters()] == ["weight", "bias"]


def test_set_reported_lr_is_what_get_last_lr_returns():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    tp.set_reported_lr(schedule, [0.25])
    assert schedule.get_last_lr() == [0.25]


def test_cuda_memory_history_api_exists():
    assert callable(torch.cuda.memory._record_memory_history) and callable(torch.cuda.memory._dump_snapshot)


@pytest.mark.gpu
def test_cuda_memory_history_is_recorded_and_dumped(tmp_path):
    tp.start_cuda_memory_history(1000)
    torch.ones(1024, device="cuda").sum().item()
    tp.dump_cuda_memory_history(tmp_path / "snapshot.pickle")
    assert (tmp_path / "snapshot.pickle").stat().st_size > 0


def test_the_elastic_agent_methods_launch_torchrun_overrides_still_exist():
    for name in ("_start_workers", "_restart_workers", "_monitor_workers"):
        assert callable(getattr(LocalElasticAgent, name)), name


def _timed_out_after() -> float | None:
    """Rank 0 waits in a collective of a group made with torch's default timeout, then given 1 s; rank 1 stays
    away: how long rank 0 waited before the collective failed (None: it did not fail)."""
    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    tp.set_group_timeout(group, datetime.timedelta(seconds=1))
    waited = None
    if dist.get_rank() == 0:
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
        except RuntimeError:
            waited = time.monotonic() - started
    else:
        time.sleep(8)  # then its exit would end rank 0's wait too: the bound below must come from the timeout
    return waited


def test_set_group_timeout_bounds_a_collective_of_an_existing_group():
    waited = run_ranks(_timed_out_after, 2, timeout=60)[0]
    assert waited is not None and waited < 5, waited
