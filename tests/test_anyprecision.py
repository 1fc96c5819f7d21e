"""AnyPrecisionAdamW: AdamW-exact in fp32, keeps sub-ulp bf16 updates with Kahan, works sharded."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import job, run_ranks, train
from torch.utils._python_dispatch import TorchDispatchMode

from fsdp_kit.optim.anyprecision import CHUNK_NUMEL, AnyPrecisionAdamW


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in shapes]


def _set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_without_kahan_matches_torch_adamw_step_after_step(weight_decay):
    ours, theirs = _params(), _params()
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": weight_decay}
    optimizer = AnyPrecisionAdamW(ours, **kwargs, momentum_dtype=torch.float32, variance_dtype=torch.float32,
                                  compensation_buffer_dtype=torch.float32, use_kahan_summation=False)
    reference = torch.optim.AdamW(theirs, **kwargs, foreach=False)
    for step in range(10):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        optimizer.step()
        reference.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)  # torch's default tolerances for fp32


def test_constructor_defaults_are_torchdistx_defaults():
    optimizer = AnyPrecisionAdamW(_params())
    defaults = optimizer.defaults
    hyper = (defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
    assert hyper == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert defaults["use_kahan_summation"] is False
    assert (defaults["momentum_dtype"], defaults["variance_dtype"], defaults["compensation_buffer_dtype"]) == (
        torch.float32, torch.bfloat16, torch.bfloat16)


def test_state_dtypes_follow_the_arguments():
    params = _params(torch.bfloat16)
    _set_grads(params, 0)
    optimizer = AnyPrecisionAdamW(params, use_kahan_summation=True, momentum_dtype=torch.bfloat16)
    optimizer.step()
    state = optimizer.state[params[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state["compensation"].dtype == torch.bfloat16
    assert float(state["step"]) == 1.0


def test_sub_ulp_updates_are_lost_by_bf16_adamw_and_kept_by_kahan():
    """Weights at 1.0 (bf16 ulp 2^-7); steps of lr=1e-4 are far below half an ulp."""
    steps, lr = 200, 1e-4
    plain = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    kahan = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    plain_opt = torch.optim.AdamW([plain], lr=lr, weight_decay=0.0)
    kahan_opt = AnyPrecisionAdamW([kahan], lr=lr, use_kahan_summation=True, momentum_dtype=torch.bfloat16)
    for _ in range(steps):
        plain.grad = torch.ones_like(plain)
        kahan.grad = torch.ones_like(kahan)
        plain_opt.step()
        kahan_opt.step()
    assert torch.all(plain == 1.0), "plain bf16 AdamW should stagnate: every update rounds away"
    expected = 1.0 - steps * lr  # each Adam step moves ~lr against a constant gradient
    assert torch.allclose(kahan.float(), torch.full((64,), expected), atol=2 ** -8), kahan[:4]


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    params = _params()
    optimizer = AnyPrecisionAdamW(params)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss > 0
    assert all(float(optimizer.state[p]["step"]) == 1.0 for p in params)


def test_chunking_gives_the_same_result_as_one_call():
    one, many = _params(), _params()
    for params, chunk in ((one, None), (many, 8)):
        kwargs = {} if chunk is None else {"chunk_elements": chunk}
        optimizer = AnyPrecisionAdamW(params, use_kahan_summation=True, weight_decay=0.1, **kwargs)
        for step in range(3):
            _set_grads(params, step)
            optimizer.step()
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="learning rate"):
        AnyPrecisionAdamW(_params(), lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        AnyPrecisionAdamW(_params(), betas=(1.0, 0.9))


def test_sharded_two_ranks_equal_one_process(tmp_path):
    overrides = ("optim=anyprecision", "optim.momentum_dtype=float32", "optim.variance_dtype=float32",
                 "optim.compensation_buffer_dtype=float32", "optim.weight_decay=0.01")
    one = run_ranks(train, 1, job(tmp_path / "one", *overrides, "trainer.batch_size=8"))[0].losses
    two = run_ranks(train, 2, job(tmp_path / "two", *overrides))[0].losses
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    assert one[4] < one[1]


def test_pure_bf16_with_anyprecision_trains_sharded(tmp_path):
    results = run_ranks(train, 2, job(tmp_path, "precision=bf16_pure", "optim=anyprecision", "trainer.max_steps=6"))
    losses = results[0].losses
    assert losses[6] < losses[1]


def test_anyprecision_preset_turns_kahan_on_and_every_argument_is_overridable(tmp_path):
    cfg = job(tmp_path, "precision=bf16_pure", "optim=anyprecision")
    assert cfg.optim.use_kahan_summation is True
    cfg = job(tmp_path, "optim=anyprecision", "optim.use_kahan_summation=false", "optim.momentum_dtype=float32",
              "optim.variance_dtype=float32", "optim.compensation_buffer_dtype=float32", "optim.eps=1e-6",
              "optim.betas=[0.8,0.9]", "optim.weight_decay=0.1", "optim.lr=3e-4")
    from fsdp_kit.optim.build import build_optimizer

    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    assert isinstance(optimizer, AnyPrecisionAdamW)
    group = optimizer.param_groups[0]
    assert (group["use_kahan_summation"], group["momentum_dtype"], group["eps"], group["betas"], group["lr"],
            group["weight_decay"]) == (False, torch.float32, 1e-6, (0.8, 0.9), 3e-4, 0.1)


def test_weight_decay_below_a_bf16_ulp_is_kept_by_kahan():
    """Zero gradients, so only the decay acts: lr * weight_decay = 2e-5 per step against a bf16 ulp of 2^-7
    at 1.0. Multiplying by (1 - 2e-5) rounds back to 1.0 every step (the non-Kahan path, and torchdistx's
    Kahan path, which decays outside the compensation); folded into the compensated sum it accumulates."""
    steps, lr, weight_decay = 500, 1e-3, 0.02
    plain = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    kahan = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    kwargs = {"lr": lr, "weight_decay": weight_decay, "momentum_dtype": torch.bfloat16}
    plain_opt = AnyPrecisionAdamW([plain], use_kahan_summation=False, **kwargs)
    kahan_opt = AnyPrecisionAdamW([kahan], use_kahan_summation=True, **kwargs)
    for _ in range(steps):
        plain.grad = torch.zeros_like(plain)
        kahan.grad = torch.zeros_like(kahan)
        plain_opt.step()
        kahan_opt.step()
    assert torch.all(plain == 1.0), "decay applied by multiplication alone should round away in bf16"
    expected = (1.0 - lr * weight_decay) ** steps  # 0.99005
    assert torch.allclose(kahan.float(), torch.full((64,), expected), atol=2 ** -9), (kahan[:4], expected)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAME = str(torch.float32).split(".")[0] + "."


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix(_NAME)


@pytest.mark.filterwarnings("ignore:AnyPrecisionAdamW variance_dtype=float16")
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("momentum_dtype", _DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("variance_dtype", _DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("compensation_dtype", _DTYPES, ids=_dtype_id)
def test_every_state_dtype_combination_trains(param_dtype, momentum_dtype, variance_dtype, compensation_dtype):
    """Least squares with one input column always 0: that weight's gradient is exactly 0, so its variance is
    0 and the denominator is eps alone (float16 flushes eps=1e-8 to 0: 0/0 was NaN from step 2)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 8, generator=generator)
    inputs[:, -1] = 0.0
    targets = inputs @ torch.randn(8, generator=generator)
    weight = torch.nn.Parameter(torch.zeros(8, dtype=param_dtype))
    optimizer = AnyPrecisionAdamW([weight], lr=0.05, use_kahan_summation=True, momentum_dtype=momentum_dtype,
                                  variance_dtype=variance_dtype, compensation_buffer_dtype=compensation_dtype)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = ((inputs @ weight.float() - targets) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = ((inputs @ weight.float() - targets) ** 2).mean().item()
    assert torch.isfinite(weight).all() and all(map(math.isfinite, [*losses, final])), losses
    assert all(b < a for a, b in zip([*losses, final], [*losses, final][1:])), losses
    assert weight[-1].item() == 0.0


@pytest.mark.filterwarnings("ignore:AnyPrecisionAdamW variance_dtype=float16")
@pytest.mark.parametrize("use_kahan_summation", [False, True])
def test_step_makes_no_host_synchronization(use_kahan_summation):
    """Counts every read of a tensor's value back to the host (Tensor.item, float(), bool(), .tolist() all
    dispatch aten._local_scalar_dense) during step(), states already created and freshly created."""
    params = _params()
    optimizer = AnyPrecisionAdamW(params, use_kahan_summation=use_kahan_summation, weight_decay=0.1,
                                  variance_dtype=torch.float16, chunk_elements=16)
    counter = _HostReads()
    for step in range(3):
        _set_grads(params, step)
        with counter:
            optimizer.step()
    assert counter.reads == [], counter.reads
    assert float(optimizer.state[params[0]]["step"]) == 3.0


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_chunk_elements_comes_from_the_config_and_must_be_positive(tmp_path):
    from fsdp_kit.errors import ConfigError
    from fsdp_kit.optim.build import build_optimizer

    cfg = job(tmp_path, "optim=anyprecision", "optim.chunk_elements=1000")
    assert build_optimizer(torch.nn.Linear(2, 2), cfg.optim).chunk_elements == 1000
    assert job(tmp_path, "optim=anyprecision").optim.chunk_elements == CHUNK_NUMEL
    with pytest.raises(ConfigError, match=r"optim\.chunk_elements=0"):
        job(tmp_path, "optim.chunk_elements=0").validated(world_size=1)


def test_float16_variance_is_refused_by_the_config_and_warned_about_by_the_optimizer(tmp_path):
    """Measured on the tiny T5: with a float16 variance, 99% of the second moments were 0 (with a nonzero
    momentum) after 2 steps, and the loss went from 7.2 to 26270 at step 3."""
    from fsdp_kit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.variance_dtype=float16.*underflows"):
        job(tmp_path, "optim=anyprecision", "optim.variance_dtype=float16").validated(world_size=1)
    with pytest.warns(UserWarning, match="variance_dtype=float16"):
        AnyPrecisionAdamW(_params(), variance_dtype=torch.float16)


def test_float16_momentum_and_compensation_train_pure_bf16_end_to_end(tmp_path):
    losses = run_ranks(train, 1, job(tmp_path, "precision=bf16_pure", "optim=anyprecision",
                                     "optim.momentum_dtype=float16", "optim.compensation_buffer_dtype=float16",
                                     "trainer.max_steps=4"))[0].losses
    assert all(math.isfinite(loss) for loss in losses.values()), losses
    assert losses[4] < losses[1], losses
