"""The model matrix: each shipped family trains sharded as in one process, finds its blocks, keeps its loss under
activation checkpointing and compile, resumes exactly, exports and reloads, and has its FLOPs counted.

One module-scoped fixture per trained family (a single-process and a 2-rank run, checkpoints at steps 2 and 4)
serves every test of that family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import job, run_ranks, train
from torch._dynamo.testing import CompileCounterWithBackend

import fsdp_kit.metrics.flops as flops_module
from fsdp_kit.checkpoint.export import export_hf
from fsdp_kit.metrics.closed_form import closed_form_flops
from fsdp_kit.metrics.flops import FlopCounter
from fsdp_kit.models.build import build as build_model
from fsdp_kit.models.build import hf_config, layer_classes
from fsdp_kit.plan import traced
from fsdp_kit.policies.config import WrapConfig, WrapPolicy
from fsdp_kit.policies.wrapping import fsdp_units

FP32_TOL = 1e-5
TRAINED = ("t5_v1_1_tiny", "bart_tiny", "llama_tiny")
"""The families the matrix trains (t5_tiny has these tests in test_parity.py, test_checkpoint.py, test_train.py)."""
BUILT = (*TRAINED, "mt5_tiny")
"""...and those it builds, compiles and counts: mT5's model is T5 v1.1's code under MT5 names, so its training rows
would repeat t5_v1_1_tiny's at ~20 s of CPU."""
BLOCKS = {"t5_v1_1_tiny": {"T5Block"}, "mt5_tiny": {"MT5Block"}, "bart_tiny": {"BartEncoderLayer", "BartDecoderLayer"},
          "llama_tiny": {"LlamaDecoderLayer"}}
"""The block classes each family's model declares (_no_split_modules): nothing in the policies names them."""
ONE_LAYER = {"t5_v1_1_tiny": ("model.hf_config.num_layers=1", "model.hf_config.num_decoder_layers=1"),
             "mt5_tiny": ("model.hf_config.num_layers=1", "model.hf_config.num_decoder_layers=1"),
             "bart_tiny": ("model.hf_config.encoder_layers=1", "model.hf_config.decoder_layers=1"),
             "llama_tiny": ("model.hf_config.num_hidden_layers=1",)}
"""The compile test builds one block per stack: its model is built and run in the test process."""


@dataclass
class Trained:
    name: str
    reference: object
    """One process, global batch 8."""
    sharded: object
    """2 ranks x 4, checkpoints at steps 2 and 4."""
    checkpoints: Path


@pytest.fixture(scope="module", params=TRAINED)
def trained(request, tmp_path_factory) -> Trained:
    name = request.param
    base = tmp_path_factory.mktemp(name)
    reference = run_ranks(train, 1, job(base / "single", f"model={name}", "trainer.batch_size=8"))[0]
    sharded = run_ranks(train, 2, job(base / "sharded", f"model={name}", "checkpoint.every=2"))[0]
    return Trained(name, reference, sharded, base / "sharded" / "checkpoints")


def _losses(result) -> list[float]:
    return [result.losses[step] for step in sorted(result.losses)]


def assert_close(got: list[float], want: list[float], tol: float = FP32_TOL) -> None:
    assert len(got) == len(want) and all(abs(g - w) <= tol for g, w in zip(got, want)), (got, want)
    assert want[-1] < want[0], "the reference did not learn; the comparison would be vacuous"


def _meta_model(name: str, tmp_path: Path):
    return build_model(job(tmp_path, f"model={name}").model)


def _blocks(model) -> list[torch.nn.Module]:
    return [module for module in model.modules() if type(module).__name__ in set(model._no_split_modules)]


def test_sharded_training_equals_one_process_on_the_same_global_batch(trained):
    assert_close(_losses(trained.sharded), _losses(trained.reference))
    assert abs(trained.sharded.evals[-1]["eval_loss"] - trained.reference.evals[-1]["eval_loss"]) <= FP32_TOL


@pytest.mark.parametrize("name", BUILT)
def test_wrap_policies_find_the_block_classes_the_model_declares(name, tmp_path):
    model = _meta_model(name, tmp_path)
    classes = layer_classes(model, None)
    assert {cls.__name__ for cls in classes} == BLOCKS[name]
    blocks = [module for module in model.modules() if isinstance(module, classes)]
    assert len(blocks) >= 2
    transformer = fsdp_units(model, WrapConfig(policy=WrapPolicy.transformer), classes)
    assert [id(unit) for unit in transformer] == [id(block) for block in blocks]
    # The size policy, at the smallest block's size, makes every block a unit of its own
    smallest = min(sum(p.numel() for p in block.parameters()) for block in blocks)
    size = fsdp_units(model, WrapConfig(policy=WrapPolicy.size, min_num_params=smallest), classes)
    assert {id(block) for block in blocks} <= {id(unit) for unit in size}


def test_size_wrapping_with_activation_checkpointing_keeps_the_loss(trained, tmp_path, capfd):
    blocks = _blocks(_meta_model(trained.name, tmp_path))
    smallest = min(sum(p.numel() for p in block.parameters()) for block in blocks)
    cfg = job(tmp_path, f"model={trained.name}", "wrap=size", f"wrap.min_num_params={smallest}", "ac=full")
    assert_close(_losses(run_ranks(train, 2, cfg)[0]), _losses(trained.reference))
    assert f"ac=full ({len(blocks)} layers)" in capfd.readouterr().out


def _batch(config, batch: int, source: int, target: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random token ids in the shapes the data layer gives the family: encoder-decoder (source, target) or the
    causal-LM objective's one sequence (source then target)."""
    generator = torch.Generator().manual_seed(0)

    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(2, config.vocab_size, shape, generator=generator).to(device)

    if config.is_encoder_decoder:
        return {"input_ids": ids(batch, source), "attention_mask": torch.ones(batch, source, dtype=torch.long),
                "decoder_input_ids": ids(batch, target), "labels": ids(batch, target)}
    return {"input_ids": ids(batch, source + target), "attention_mask": torch.ones(batch, source + target,
                                                                                   dtype=torch.long),
            "labels": ids(batch, source + target)}


@pytest.mark.parametrize("name", BUILT)
def test_a_compiled_block_keeps_the_loss_and_gradients(name, tmp_path):
    """The last block (a decoder block: self- and cross-attention) compiled as the trainer compiles it, with
    aot_eager: dynamo captures it and AOTAutograd traces its forward and backward, as with inductor, without
    inductor's code generation (which costs minutes on CPU). test_train.py trains compiled T5 blocks with inductor."""
    from fsdp_kit.models.objective import token_loss

    cfg = job(tmp_path, f"model={name}", *ONE_LAYER[name]).model
    model = build_model(cfg, device="cpu")
    batch = _batch(model.config, 2, 16, 8)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss_sum, count = token_loss(model, batch)
        (loss_sum / count).backward()
        return loss_sum.detach() / count, [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    backend = CompileCounterWithBackend("aot_eager")
    _blocks(model)[-1].compile(backend=backend)
    compiled_loss, compiled_grads = loss_and_grads()
    assert backend.frame_count >= 1, "nothing was compiled"
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-6)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_resume_from_a_checkpoint_reproduces_the_losses_exactly(trained, tmp_path):
    cfg = job(tmp_path, f"model={trained.name}", f"checkpoint.resume={trained.checkpoints / 'step_2'}")
    resumed = run_ranks(train, 2, cfg)[0]
    assert sorted(resumed.losses) == [3, 4]
    assert all(abs(resumed.losses[s] - trained.sharded.losses[s]) <= 1e-6 for s in (3, 4)), \
        (resumed.losses, trained.sharded.losses)


def test_export_reloads_through_model_pretrained_with_the_trained_loss(trained, tmp_path):
    """The exported folder, trained from with model.pretrained, evaluates (step 0) to the loss the run ended with,
    and generates."""
    folder = export_hf(trained.checkpoints / "step_4", tmp_path / "hf")
    cfg = job(tmp_path / "reload", f"model={trained.name}", f"model.pretrained={folder}", "trainer.max_steps=1",
              "trainer.eval_every=1", "trainer.eval_generate=true")
    reloaded = run_ranks(train, 2, cfg)[0]
    assert reloaded.evals[0]["step"] == 0
    assert abs(reloaded.evals[0]["eval_loss"] - trained.sharded.evals[-1]["eval_loss"]) <= 1e-6, \
        (reloaded.evals, trained.sharded.evals)
    assert 0.0 <= reloaded.evals[-1]["exact_match"] <= 1.0


@pytest.mark.parametrize("name", [*BUILT, "gpt2_tiny"])  # t5_tiny: test_metrics.py
def test_flop_counter_and_planner_equal_the_closed_form(name, tmp_path, monkeypatch):
    monkeypatch.setattr(flops_module, "COUNTED", {})  # the counter under test counts
    cfg = job(tmp_path, f"model={name}").model
    config = hf_config(cfg)
    batch, source, target = 2, 24, 8
    shapes = {key: tuple(value.shape) for key, value in _batch(config, batch, source, target, "meta").items()}
    assert FlopCounter(cfg, config).flops_for_shapes(shapes) == closed_form_flops(config, batch, source, target)
    # the planner traces the same model (activations and FLOPs of one sample at the job's lengths)
    planning = job(tmp_path, f"model={name}", f"data.max_source_len={source}", f"data.max_target_len={target}")
    assert traced(planning).flops_per_sample == closed_form_flops(config, 1, source, target)


@pytest.mark.parametrize(("name", "params"), [("flan_t5_base", 247_577_856), ("mt5_small", 300_176_768)])
def test_v1_1_presets_have_the_hub_checkpoints_parameters(name, params, tmp_path):
    """The public google/flan-t5-base and google/mt5-small checkpoints' parameter counts: gated feed-forward and a head
    of its own (transformers 5.x configs tie it unless told otherwise)."""
    model = _meta_model(name, tmp_path)
    assert model.config.is_gated_act and model.lm_head.weight is not model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert sum(p.numel() for p in model.parameters()) == params
