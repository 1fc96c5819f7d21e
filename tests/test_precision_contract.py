"""The precision contract (fsdp_kit/policies/contract.py): every preset and every AnyPrecision dtype combination,
checked on real FSDP2 (2 gloo ranks) after the first optimizer step, in the checkpoint DCP saved and in the export."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers import job, run_cli, run_ranks, train
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from fsdp_kit.optim.config import OptimConfig, OptimizerName, StateDtype
from fsdp_kit.policies.config import Precision
from fsdp_kit.policies.contract import CONTRACT, KEEP_FP32, README_OPTIMIZERS, expected, group_of, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
STATE_DTYPES = [StateDtype.float32, StateDtype.bfloat16, StateDtype.float16]


def _dtype(value: object) -> str:
    return str(value).removeprefix("torch.")


def _checkpoint_dtypes(checkpoint: Path) -> dict[str, dict[str, set[str]]]:
    """{group: {"checkpoint" | "optimizer.<state>": dtypes}} from the DCP metadata (what was saved)."""
    found: dict[str, dict[str, set[str]]] = {}
    for key, meta in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.items():
        dtype = getattr(getattr(meta, "properties", None), "dtype", None)
        if dtype is None or key.endswith(".step"):
            continue
        if key.startswith("model."):
            name, role = key.removeprefix("model."), "checkpoint"
        elif key.startswith("optim.state."):
            name, state = key.removeprefix("optim.state.").rsplit(".", 1)
            role = f"optimizer.{state}"
        else:
            continue
        found.setdefault(group_of(name, {"wo"}), {}).setdefault(role, set()).add(_dtype(dtype))
    return found


@pytest.mark.parametrize("precision,optim", [("fp32", "adamw"), ("bf16", "adamw"), ("fp16", "adamw"),
                                             ("bf16_pure", "anyprecision")])
def test_each_preset_keeps_its_contract_in_training_checkpoint_and_export(precision, optim, tmp_path):
    run_ranks(train, 2, job(tmp_path / "run", f"precision={precision}", f"optim={optim}", "trainer.max_steps=1",
                            "checkpoint.at_end=true"))
    report = json.loads((tmp_path / "run" / "precision.json").read_text())
    assert report["matches"], report["differences"]
    want = report["expected"]
    assert set(report["observed"]) == {"model", KEEP_FP32}  # T5 declares wo: it has its own row
    if precision in ("bf16", "fp16"):  # wo computes in fp32 while the rest computes in the preset's dtype
        assert report["observed"][KEEP_FP32]["compute"] == "float32"
        assert report["observed"]["model"]["compute"] == precision.replace("bf", "bfloat").replace("fp", "float")

    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    saved = _checkpoint_dtypes(checkpoint)
    for group, roles in want.items():
        assert saved[group]["checkpoint"] == {roles["checkpoint"]}, group
        for role in (r for r in roles if r.startswith("optimizer.")):
            assert saved[group][role] == {roles[role]}, (group, role)

    outcome = run_cli("export", str(checkpoint), str(tmp_path / "hf"), cwd=tmp_path)
    assert outcome.code == 0, outcome.stderr
    exported: dict[str, set[str]] = {}
    for key, tensor in load_file(tmp_path / "hf" / "model.safetensors").items():
        exported.setdefault(group_of(key, {"wo"}), set()).add(_dtype(tensor.dtype))
    assert exported == {group: {roles["export"]} for group, roles in want.items()}


def _combinations() -> list[OptimConfig]:
    """Every AnyPrecision state dtype combination fsdp_kit's config accepts (float16 variance is refused), with
    and without Kahan summation (without it, no compensation buffer exists, whatever its dtype)."""
    combos = [OptimConfig(name=OptimizerName.anyprecision, momentum_dtype=m, variance_dtype=v,
                          compensation_buffer_dtype=c, use_kahan_summation=kahan)
              for m, v, c, kahan in itertools.product(STATE_DTYPES, STATE_DTYPES[:2], STATE_DTYPES, (True, False))]
    return [*combos, OptimConfig(name=OptimizerName.adamw)]


def _first_steps(cfgs: list, optims: list[OptimConfig]) -> list[str]:
    """Rank body: per preset, shard the model once; per optimizer, take a first step (a fresh optimizer creates its
    states at its first step) and compare with the contract."""
    from fsdp_kit import distributed
    from fsdp_kit.models.build import build as build_model
    from fsdp_kit.models.objective import token_loss
    from fsdp_kit.optim.build import build_optimizer
    from fsdp_kit.policies.contract import PrecisionProbe, compare, keep_fp32_names
    from fsdp_kit.policies.precision import param_dtype
    from fsdp_kit.train import shard_and_materialize

    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 384, (2, 12), generator=generator),
             "attention_mask": torch.ones(2, 12, dtype=torch.long),
             "decoder_input_ids": torch.randint(2, 384, (2, 4), generator=generator),
             "labels": torch.randint(2, 384, (2, 4), generator=generator)}
    problems = []
    with distributed.session(distributed.detect(), cfgs[0].dist, cfgs[0].sharding) as env:
        assert env.world_size == 2
        for cfg in cfgs:
            model = build_model(cfg.model, dtype=param_dtype(cfg.precision))
            shard_and_materialize(model, cfg, env)
            for optim in optims:
                optimizer = build_optimizer(model, optim)
                probe = PrecisionProbe(model, optimizer)
                token_loss(model, batch)[0].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                assert probe.done
                want = expected(cfg.precision.name, optim, bool(keep_fp32_names(model)))
                problems += [f"{cfg.precision.name} {optim}: {line}" for line in compare(want, probe.observed())]
    return problems


def test_every_anyprecision_dtype_combination_keeps_the_contract(tmp_path):
    cfgs = [job(tmp_path, f"precision={precision}") for precision in ("bf16", "bf16_pure")]
    problems = run_ranks(_first_steps, 2, cfgs, _combinations(), timeout=240)
    assert problems == [[], []]


def test_the_contract_names_every_state_of_each_combination():
    """A combination's rows list exactly the states AnyPrecision keeps (the compensation buffer only with Kahan)."""
    for optim in _combinations():
        states = {k for k in expected(Precision.bf16_pure, optim, True)[KEEP_FP32] if k.startswith("optimizer.")}
        kahan = optim.name == OptimizerName.anyprecision and optim.use_kahan_summation
        assert states == {"optimizer.exp_avg", "optimizer.exp_avg_sq"} | ({"optimizer.compensation"} if kahan
                                                                           else set())


def test_readme_shows_the_contract_table():
    table = markdown_table(README_OPTIMIZERS)
    assert table in README.read_text(), "regenerate README's table: python -m fsdp_kit.policies.contract"
    assert len(CONTRACT) == len(Precision)
