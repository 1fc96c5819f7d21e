"""Selective activation checkpointing (same loss and gradients as none) and ac=auto's choice."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import job

from fsdp_kit.models.build import build as build_model
from fsdp_kit.models.build import layer_classes, layers
from fsdp_kit.models.objective import token_loss
from fsdp_kit.plan import choose_checkpointing, model_shape, traced
from fsdp_kit.plan.memory import breakdown
from fsdp_kit.policies.activation import apply_checkpointing
from fsdp_kit.policies.config import ActivationCheckpointConfig, CheckpointMode


def _loss_and_grads(model, batch):
    loss, _ = token_loss(model, batch)
    loss.backward()
    # the checkpoint wrapper adds a level to parameter names: strip it so both models name them alike
    return loss.detach(), {name.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                           for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", [CheckpointMode.selective, CheckpointMode.full])
def test_checkpointed_layers_give_the_same_loss_and_gradients_as_none(mode, tmp_path):
    cfg = job(tmp_path, "model.dropout=0.0")
    torch.manual_seed(0)
    plain = build_model(cfg.model, device="cpu")  # random init on CPU
    wrapped = copy.deepcopy(plain)
    layer_cls = layer_classes(wrapped, None)
    assert apply_checkpointing(wrapped, ActivationCheckpointConfig(mode=mode), layer_cls) == len(
        layers(plain, layer_cls))
    assert "CheckpointWrapper" in {type(m).__name__ for m in wrapped.modules()}
    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, 200, (2, 24), generator=generator),
             "attention_mask": torch.ones(2, 24, dtype=torch.long),
             "decoder_input_ids": torch.randint(3, 200, (2, 8), generator=generator),
             "labels": torch.randint(3, 200, (2, 8), generator=generator)}
    loss, grads = _loss_and_grads(plain, batch)
    loss_ac, grads_ac = _loss_and_grads(wrapped, batch)
    assert loss_ac.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-6)
    assert grads_ac.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ac[name], grad, rtol=1e-6, atol=1e-6)


def test_selective_keeps_matmul_outputs_between_none_and_full(tmp_path):
    cfg = job(tmp_path, "model.dropout=0.0", "data.max_source_len=64", "data.max_target_len=16")
    acts = traced(cfg).activations
    layers = set(range(len(acts.per_layer)))
    none, selective, full = acts.saved(set()), acts.saved(layers, selective=True), acts.saved(layers)
    assert full < selective < none
    assert all(acts.selective_outputs[i] for i in layers)  # every layer ran matmuls the trace saw


def test_auto_picks_the_lightest_mode_that_fits_the_budget(tmp_path):
    cfg = job(tmp_path, "model.dropout=0.0", "ac=auto", "trainer.batch_size=64", "data.max_source_len=64",
              "data.max_target_len=16")
    shape, acts = model_shape(cfg), traced(cfg).activations
    totals = {mode: breakdown(job(tmp_path, f"ac={mode}", "trainer.batch_size=64", "model.dropout=0.0",
                                  "data.max_source_len=64", "data.max_target_len=16"), shape, acts, 64, 1, 1).total
              for mode in CheckpointMode.lightest_first()}
    assert totals[CheckpointMode.none] > totals[CheckpointMode.selective] > totals[CheckpointMode.full]
    for mode in CheckpointMode.lightest_first():
        chosen, memory = choose_checkpointing(cfg, 1, 1, totals[mode] + 1)
        lighter = CheckpointMode.lightest_first()[:CheckpointMode.lightest_first().index(chosen.mode)]
        assert memory.total <= totals[mode] + 1
        assert all(totals[m] > totals[mode] + 1 for m in lighter)  # nothing lighter fits
    chosen, _ = choose_checkpointing(cfg, 1, 1, 1.0)  # nothing fits: the heaviest, the caller reports it
    assert chosen.mode == CheckpointMode.full


def test_auto_says_when_even_full_checkpointing_does_not_fit(tmp_path):
    """choose_checkpointing falls back to full and leaves the report to its caller; the caller said nothing."""
    from fsdp_kit.plan import resolve_auto_checkpointing

    cfg = job(tmp_path, "ac=auto", "ac.budget_gb=0.000001")
    with pytest.warns(UserWarning, match="no checkpointing mode fits"):
        chosen = resolve_auto_checkpointing(cfg, 1, 1, torch.device("cpu"))
    assert chosen.ac.mode == CheckpointMode.full
