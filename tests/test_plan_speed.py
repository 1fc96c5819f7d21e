"""The planner's step time: the traced work of a step, the optimizer's traffic, and the calibration fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fsdp_kit.launch.slurm import compose_job
from fsdp_kit.plan import _batch_shapes, _meta_model, make_plan, model_shape, traced, traced_work
from fsdp_kit.plan.calibration import Calibration, Observation, fit, predict
from fsdp_kit.plan.speed import observation, optimizer_traffic
from fsdp_kit.plan.work import StepWork, _trace, op_bytes, step_work

TINY = ["model=t5_tiny", "cluster=h100", "data=synthetic", "data.max_source_len=32", "data.max_target_len=8"]


def _fresh_trace(job, batch: int):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fsdp_kit.plan import activations

    model, layer_cls = _meta_model(model=job.model, precision=job.precision, wrap=job.wrap)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, activations._gpu_like_attention():
        activations._fake_parameters(model, mode)
        return _trace(model, layer_cls, _batch_shapes(job.data, True, batch))


def test_work_interpolated_from_batches_2_and_3_equals_a_trace_at_batch_5():
    job = compose_job(TINY)
    model, layer_cls = _meta_model(model=job.model, precision=job.precision, wrap=job.wrap)
    work = step_work(model, layer_cls, lambda batch: _batch_shapes(job.data, True, batch))
    total, per_layer = _fresh_trace(job, 5)
    at_five = work.at(5)
    for name in ("matmul_flops", "attention_flops", "kernels"):
        assert getattr(at_five, name) == pytest.approx(getattr(total, name), rel=1e-9), name
    # bytes are linear but for broadcast reads (a bias read once per batch, not per sample): within 2%
    assert at_five.memory_bytes == pytest.approx(total.memory_bytes, rel=0.02)
    assert work.layer_forward[0].at(5).matmul_flops == pytest.approx(per_layer[0].matmul_flops)
    # the counted matmul and attention FLOPs are the model FLOPs that FlopCounterMode counts
    flops = traced(job).flops_per_sample * 5
    # (plus the scores that fused attention recomputes in backward: under 1% here)
    assert at_five.matmul_flops + at_five.attention_flops == pytest.approx(flops, rel=0.01)
    assert at_five.matmul_flops + at_five.attention_flops > flops


def test_checkpointing_adds_the_forward_of_the_layers_it_checkpoints():
    work: StepWork = traced_work(compose_job(TINY))
    plain = work.at(4)
    full = work.at(4, {0, 1})
    selective = work.at(4, {0, 1}, selective=True)
    forward = work.layer_forward[0].at(4) + work.layer_forward[1].at(4)
    assert full.matmul_flops - plain.matmul_flops == pytest.approx(forward.matmul_flops)
    assert full.memory_bytes - plain.memory_bytes == pytest.approx(forward.memory_bytes)
    assert selective.matmul_flops == pytest.approx(plain.matmul_flops)  # matmul outputs are kept, not recomputed
    assert selective.memory_bytes == pytest.approx(full.memory_bytes)


def test_op_bytes_count_reads_and_writes_and_nothing_for_views():
    a, b = torch.ones(8, 4), torch.ones(8, 4)
    aten = torch.ops.aten
    assert op_bytes(aten.add.Tensor, (a, b), {}, a + b) == 3 * a.nbytes
    assert op_bytes(aten.add_.Tensor, (a, b), {}, a) == 3 * a.nbytes  # reads both, writes a
    assert op_bytes(aten.t.default, (a,), {}, a.t()) == 0
    assert op_bytes(aten.empty_like.default, (a,), {}, torch.empty_like(a)) == 0
    assert op_bytes(aten.zeros_like.default, (a,), {}, torch.zeros_like(a)) == a.nbytes


def _optim(*overrides: str) -> tuple[float, int]:
    return optimizer_traffic(compose_job([*TINY, *overrides]))


def test_optimizer_traffic_follows_dtypes_fusion_and_kahan():
    fp32, _ = _optim("precision=fp32", "optim=adamw")
    bf16_pure, _ = _optim("precision=bf16_pure", "optim=adamw")
    assert fp32 == pytest.approx(2 * bf16_pure, rel=1e-5)  # the same ops on half the bytes (the step counts aside)
    fused, kernels = _optim("precision=fp32", "optim=adamw", "optim.fused=true")
    assert fused < fp32 and kernels == 1
    kahan, _ = _optim("precision=bf16_pure", "optim=anyprecision", "optim.use_kahan_summation=true")
    plain, _ = _optim("precision=bf16_pure", "optim=anyprecision", "optim.use_kahan_summation=false")
    assert kahan > plain  # the compensation buffer is read and written


def test_fit_recovers_the_efficiencies_that_made_the_measurements_and_keeps_unexercised_ones():
    truth = Calibration(0.4, 0.7, 0.6, 2e-5)
    rows = []
    for i in range(5):
        terms = Observation(0.1 * (i + 1), 0.0, 0.05 * (5 - i) + 0.01, 1000.0 * (i % 3 + 1), 0.0)
        rows.append(dataclasses.replace(terms, measured_s=predict(truth, terms)))
    default = Calibration(0.5, 0.33, 0.5, 1e-5)
    found = fit(rows, default)
    assert found.matmul_efficiency == pytest.approx(0.4)
    assert found.memory_efficiency == pytest.approx(0.6)
    assert found.seconds_per_kernel == pytest.approx(2e-5)
    assert found.fp32_matmul_efficiency == default.fp32_matmul_efficiency  # no fp32 run to fit it to
    assert all(predict(found, r) == pytest.approx(r.measured_s) for r in rows)


def test_step_time_grows_with_batch_and_checkpointing_and_the_source_names_the_calibration():
    def compute_s(*overrides: str) -> float:
        return make_plan(compose_job([*TINY, *overrides])).speed.compute_s

    assert compute_s("trainer.batch_size=16") > compute_s("trainer.batch_size=8")
    assert compute_s("ac=full") > compute_s("ac=selective") > compute_s("ac=none")
    speed = make_plan(compose_job(TINY)).speed
    assert speed.tflops_source.startswith("calibrated: ") and "fitted to" in speed.tflops_source


def test_observation_prices_fp32_on_the_fp32_peak():
    job = compose_job([*TINY, "precision=fp32"])
    terms = observation(job, model_shape(job), traced_work(job), 8, 1)
    assert terms.bf16_matmul_s == 0 and terms.fp32_matmul_s > 0
    bf16 = compose_job([*TINY, "precision=bf16"])
    assert observation(bf16, model_shape(bf16), traced_work(bf16), 8, 1).fp32_matmul_s == 0


@pytest.mark.parametrize("setting", ["cluster.memory_bandwidth_gb_s=-5", "cluster.memory_bandwidth_gb_s=0",
                                     "cluster.peak_tflops_fp32=0"])
def test_bad_gpu_figures_are_refused_with_one_line(setting):
    from fsdp_kit.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        make_plan(compose_job([*TINY, setting]))
    assert setting.split("=")[0] in str(info.value) and "must be > 0" in str(info.value)


def test_the_activation_profile_does_not_depend_on_what_was_traced_before():
    """FakeTensorMode's dispatch cache is shared across modes; with it on, a tensor several layers share (T5's
    position bias) was counted differently after another trace had filled the cache."""
    from fsdp_kit import plan

    job = compose_job([*TINY, "precision=bf16"])
    def counted(profile) -> tuple:  # storage ids differ between traces; the byte counts must not
        return (profile.outside_layers, profile.per_layer, profile.shared_inputs(), profile.saved({0, 1}),
                [sorted(inputs.values()) for inputs in profile.layer_inputs])

    plan._TRACED.clear()
    first = counted(traced(job).activations)
    plan._TRACED.clear()
    plan._WORK.clear()
    traced_work(job)  # fills the fake-tensor cache with the same ops
    assert counted(traced(job).activations) == first
    assert first[2] > 0
