"""Resume restores optimizer state with the dtypes and values it was saved with, so an interrupted run
continues exactly like an uninterrupted one (torch's Optimizer.load_state_dict casts state to the
parameter dtype: AnyPrecision's bf16 variance became fp32 under fp32 weights, fp32 momentum bf16 under
bf16 weights)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import job, run_ranks

from fsdp_kit.checkpoint.state import TrainState
from fsdp_kit.optim.anyprecision import AnyPrecisionAdamW

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              pytest.mark.filterwarnings("ignore:AnyPrecisionAdamW variance_dtype=float16")]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# One AnyPrecision setting per run that both widens and narrows under each precision: under fp32 weights the
# bf16 variance and fp16 compensation were widened, under bf16 weights the fp32 momentum was narrowed.
_MIXED = ("float32", "bfloat16", "float16")
_STATE_DTYPE_CASES = [("adamw", None), *(("anyprecision", c) for c in itertools.product(_DTYPES, repeat=3))]


def _model(param_dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(param_dtype)


def _optimizer(name: str, model: torch.nn.Module, dtypes: tuple[str, str, str] | None) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    momentum, variance, compensation = (_DTYPES[d] for d in dtypes)
    return AnyPrecisionAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, use_kahan_summation=True,
                             momentum_dtype=momentum, variance_dtype=variance, compensation_buffer_dtype=compensation)


def _train_state(param_dtype: torch.dtype, name: str, dtypes) -> TrainState:
    model = _model(param_dtype)
    optimizer = _optimizer(name, model, dtypes)
    return TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))


def _steps(state: TrainState, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(16, 6, generator=generator)
        targets = torch.randn(16, 1, generator=generator)
        loss = ((state.model(inputs.to(state.model[0].weight.dtype)).float() - targets) ** 2).mean()
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "dtypes"), _STATE_DTYPE_CASES,
                         ids=[n if d is None else f"{n}-{'-'.join(d)}" for n, d in _STATE_DTYPE_CASES])
def test_dcp_resume_keeps_state_dtypes_and_values(param_dtype, name, dtypes, tmp_path):
    """The checkpoint path in one process: TrainState.state_dict -> dcp.save -> fresh objects ->
    dcp.load into their state dict -> TrainState.load_state_dict (what checkpoint.CheckpointManager does)."""
    reference = _train_state(param_dtype, name, dtypes)
    _steps(reference, range(3))

    interrupted = _train_state(param_dtype, name, dtypes)
    _steps(interrupted, range(2))
    saved = _optimizer_state(interrupted.optimizer)
    dcp.save(interrupted.state_dict(), checkpoint_id=str(tmp_path))

    resumed = _train_state(param_dtype, name, dtypes)
    payload = resumed.state_dict()
    dcp.load(payload, checkpoint_id=str(tmp_path))
    resumed.load_state_dict(payload)
    for before, after in zip(saved, _optimizer_state(resumed.optimizer), strict=True):
        assert before.keys() == after.keys()
        for key in before:
            assert after[key].dtype == before[key].dtype, (key, before[key].dtype, after[key].dtype)
            torch.testing.assert_close(after[key].cpu(), before[key].cpu(), rtol=0, atol=0, msg=key)

    _steps(resumed, range(2, 3))
    for a, b in zip(resumed.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(_optimizer_state(resumed.optimizer), _optimizer_state(reference.optimizer), strict=True):
        for key in a:
            assert a[key].dtype == b[key].dtype
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_torch_save_round_trip_and_deepcopy_continue_exactly(tmp_path):
    """The non-DCP paths: optimizer.state_dict() through torch.save/torch.load into a fresh optimizer, and a
    deep copy (which restores state without load_state_dict), both continue like the original."""
    reference = _train_state(torch.bfloat16, "anyprecision", _MIXED)
    _steps(reference, range(2))
    torch.save({"model": reference.model.state_dict(), "optim": reference.optimizer.state_dict()}, tmp_path / "s.pt")
    copied = copy.deepcopy(reference)
    loaded = _train_state(torch.bfloat16, "anyprecision", _MIXED)
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    loaded.model.load_state_dict(saved["model"])
    loaded.optimizer.load_state_dict(saved["optim"])
    entry = loaded.optimizer.state[loaded.model[0].weight]
    assert (entry["step"].item(), entry["step"].dtype, entry["step"].device.type) == (2.0, torch.float32, "cpu")
    assert [entry[k].dtype for k in ("exp_avg", "exp_avg_sq", "compensation")] == [_DTYPES[d] for d in _MIXED]
    for state in (reference, copied, loaded):
        _steps(state, range(2, 4))
    for other in (copied, loaded):
        for a, b in zip(other.model.parameters(), reference.model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _train_and_capture(cfg):
    """Rank body: train, then return this rank's local parameters and optimizer state after the run."""
    import fsdp_kit.training.trainer as trainer_module
    from fsdp_kit.train import run

    captured = {}
    original = trainer_module.Trainer.fit

    def fit(self):
        result = original(self)
        captured["params"] = [p.to_local().detach().clone() for p in self.model.parameters()]
        captured["state"] = [{k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
                              for k, v in self.optimizer.state[p].items()} for p in self.model.parameters()]
        return result

    trainer_module.Trainer.fit = fit
    result = run(cfg)
    return result.losses, captured


# AnyPrecision at 1 and 2 ranks; torch's AdamW (state always in the parameter dtype, which torch's cast keeps)
# at 2 ranks only, its single-process path is covered by the DCP test above. Each case is two training runs.
_RUNS = [(optim, precision, world) for optim, precision, world in
         itertools.product(["adamw", "anyprecision"], ["fp32", "bf16_pure"], [1, 2])
         if optim == "anyprecision" or world == 2]


@pytest.mark.parametrize(("optim", "precision", "world"), _RUNS, ids=["-".join(map(str, r)) for r in _RUNS])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(optim, precision, world, tmp_path):
    """3 steps straight vs 2 steps, checkpoint, resume for step 3; the step-3 update reads the restored state."""
    extra = [f"precision={precision}", f"optim={optim}", "trainer.max_steps=3", f"trainer.batch_size={8 // world}",
             "optim.weight_decay=0.01"]
    if optim == "anyprecision":
        extra += [f"optim.{key}={value}" for key, value in
                  zip(("momentum_dtype", "variance_dtype", "compensation_buffer_dtype"), _MIXED)]
    reference_losses, reference = run_ranks(_train_and_capture, world, job(tmp_path / "a", *extra,
                                                                            "checkpoint.every=2"))[0]
    checkpoint = Path(tmp_path / "a" / "checkpoints" / "step_2")
    losses, resumed = run_ranks(_train_and_capture, world, job(tmp_path / "b", *extra,
                                                                f"checkpoint.resume={checkpoint}"))[0]
    assert sorted(losses) == [3] and abs(losses[3] - reference_losses[3]) <= 1e-6
    tolerance = 1e-6 if precision == "fp32" else 0.0
    for a, b in zip(resumed["params"], reference["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance)
    for a, b in zip(resumed["state"], reference["state"], strict=True):
        for key in b:
            assert a[key].dtype == b[key].dtype, (key, a[key].dtype, b[key].dtype)
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=tolerance, msg=key)
