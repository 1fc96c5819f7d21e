"""Every shipped config composes and validates; every bad input gets one clear line naming the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import CONFIG_DIR, Outcome, compose_cfg, job, run_cli

from fsdp_kit.config import TrainConfig
from fsdp_kit.errors import ConfigError
from fsdp_kit.models.build import build as build_model
from fsdp_kit.models.build import hf_config
from fsdp_kit.policies.apply import Policies, check_policies
from fsdp_kit.preflight import preflight

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}


def _extra_for(group: str, option: str, tmp_path: Path) -> list[str]:
    if group == "data" and option in ("csv", "jsonl"):
        path = tmp_path / f"d.{option}"
        rows = [("text", "headline")] + [(f"article {i}", f"title {i}") for i in range(300)]
        if option == "csv":
            path.write_text("\n".join(",".join(r) for r in rows))
        else:
            path.write_text("\n".join(f'{{"text": "{a}", "headline": "{b}"}}' for a, b in rows[1:]))
        return [f"data.path={path}"]
    if group == "data" and option == "hf":
        return ["data.hf_name=some/dataset"]
    return []


CASES = [(group, option) for group, options in sorted(GROUPS.items()) for option in options if group != "experiment"]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    extra = _extra_for(group, option, tmp_path)
    cfg = job(tmp_path, f"{group}={option}", *extra, fast=False)
    assert isinstance(cfg, TrainConfig)
    try:
        preflight(cfg, world_size=1, device_type="cpu")
    except ConfigError as err:  # data=hf needs the optional datasets package; anything else must validate
        assert group == "data" and option == "hf" and "datasets" in str(err)
    if group == "model":
        meta = build_model(cfg.model)  # on meta: no memory, even for T5-11B
        check_policies(meta, Policies.of(cfg))
        assert sum(p.numel() for p in meta.parameters()) > 0


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_experiment_presets_compose_validate_and_have_the_blog_shape(experiment, tmp_path):
    cfg = job(tmp_path, f"experiment={experiment}", fast=False)
    preflight(cfg, world_size=8, device_type="cpu")
    assert (cfg.precision.name, cfg.wrap.policy, cfg.ac.mode) == ("bf16", "transformer", "full")
    assert (cfg.data.max_source_len, cfg.data.max_target_len) == (512, 128)
    meta = build_model(cfg.model)
    expected = {"t5_3b_a100_1node": 2_851_598_336, "t5_11b_a100_3nodes": 11_307_321_344}[experiment]
    assert sum(p.numel() for p in meta.parameters()) == expected


def test_preset_shapes_match_public_t5_parameter_counts(tmp_path):
    # Public counts (tied embeddings): t5-small 60.5M, t5-base 222.9M, t5-large 737.7M.
    expected = {"t5_small": 60_506_624, "t5_base": 222_903_552, "t5_large": 737_668_096}
    for name, count in expected.items():
        meta = build_model(job(tmp_path, f"model={name}", fast=False).model)
        assert sum(p.numel() for p in meta.parameters()) == count


def test_defaults_are_the_tiny_t5_on_the_builtin_task(tmp_path):
    cfg = job(tmp_path, fast=False)
    assert (cfg.model.name, cfg.data.source, cfg.precision.name, cfg.sharding.strategy) == (
        "t5_tiny", "builtin", "fp32", "full_shard")


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["wrap.layer_cls=[FooBlock]"], 1, "FooBlock, which T5ForConditionalGeneration does not have"),
        (["sharding=hybrid_shard", "sharding.shard_group_size=2"], 3, "world size 3 is not divisible"),
        (["sharding.shard_group_size=2"], 2, "only applies to hybrid strategies"),
        (["data=csv", "data.path=/nonexistent/wikihow.csv"], 1, "does not exist"),
        (["trainer.batch_size=0"], 1, "trainer.batch_size=0 must be > 0"),
        (["optim.betas=[0.9]"], 1, "optim.betas"),
        (["precision.name=bf8"], 1, "Invalid value 'bf8', expected one of [fp32, bf16, fp16, bf16_pure]"),
        (["sharding=fulll_shard"], 1, "Could not find 'sharding/fulll_shard'"),
        (["data.eval_examples=4", "trainer.batch_size=4"], 2, "less than one global batch"),
        (["checkpoint.resume=/nonexistent/step_5"], 1, "does not exist"),
    ],
)
def test_bad_config_is_rejected_with_a_fix(overrides, world, message, tmp_path):
    with pytest.raises(Exception) as info:
        cfg = job(tmp_path, *overrides)
        preflight(cfg, world_size=world, device_type="cpu")
        check_policies(build_model(cfg.model), Policies.of(cfg))
    assert message in str(info.value)
    assert "Fix:" in str(info.value)


def test_missing_csv_column_names_the_columns_it_has(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("title,body\nA,B\n")
    with pytest.raises(ConfigError, match=r"no column 'text', 'headline' \(it has 'title', 'body'\)"):
        preflight(job(tmp_path, "data=csv", f"data.path={path}"), world_size=1, device_type="cpu")


def test_fp16_with_t5_warns_about_overflow(tmp_path):
    with pytest.warns(UserWarning, match="overflow"):
        preflight(job(tmp_path, "precision=fp16"), world_size=1, device_type="cpu")


def test_pure_bf16_with_plain_adamw_warns_about_stagnation(tmp_path):
    with pytest.warns(UserWarning, match="stagnates"):
        preflight(job(tmp_path, "precision=bf16_pure", "optim=adamw"), world_size=1, device_type="cpu")


def test_unknown_hf_model_type_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.arch='not_a_model' is not a transformers model type"):
        hf_config(job(tmp_path, "model.arch=not_a_model").model)


def test_missing_pretrained_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="the folder does not exist"):
        hf_config(job(tmp_path, f"model.pretrained={tmp_path / 'nothing-here'}").model)


def test_csv_path_is_required(tmp_path):
    cfg = TrainConfig.from_hydra(compose_cfg(["data=csv", f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"data=csv needs a file. Fix: pass data.path=/path/to/file.csv"):
        preflight(cfg, world_size=1, device_type="cpu")


def _cli(*args: str, env: dict, cwd: Path) -> Outcome:
    """``fsdp-kit train ARGS`` (the Hydra app of ``python -m fsdp_kit.train``) in a forked process."""
    return run_cli("train", *args, env=env, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["trainer.batch_sise=4"], {}, "batch_sise"),
        (["precision=bf61"], {}, "Could not find 'precision/bf61'"),
        (["trainer.batch_size=abc"], {}, "trainer.batch_size"),
        (["wrap.layer_cls=[FooBlock]"], {}, "error: wrap.layer_cls names FooBlock"),
        (["data=csv", "data.path=missing.csv"], {}, "error: data.path='missing.csv' does not exist"),
        (["sharding=hybrid_shard", "sharding.shard_group_size=2"], {"WORLD_SIZE": "3"}, "not divisible"),
    ],
    ids=["unknown-key", "unknown-option", "wrong-type", "layer-class", "missing-file", "hybrid-divisibility"],
)
def test_cli_rejects_bad_input_with_one_line_and_no_traceback(args, env, expected, tmp_path):
    result = _cli(f"hydra.run.dir={tmp_path}", *args, env=env, cwd=tmp_path)
    assert result.code != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


CONFIG_ONLY = textwrap.dedent("""
    import sys
    from fsdp_kit.cli import build_parser, main
    from fsdp_kit.config import compose_job
    from fsdp_kit.errors import ConfigError
    import fsdp_kit.launch.sbatch, fsdp_kit.launch.sweep, fsdp_kit.preflight, fsdp_kit.train

    build_parser().format_help()
    compose_job(["model=t5_3b", "precision=bf16", "cluster=p4d"])
    try:
        compose_job(["trainer.max_steps=-1"]).validated()
        raise SystemExit("trainer.max_steps=-1 was not refused")
    except ConfigError:
        pass
    heavy = ("torch", "transformers", "torch.distributed.checkpoint", "torch._dynamo")
    print("config:", [name for name in heavy if name in sys.modules])
    try:
        main(["train", "trainer.max_steps=-1", f"hydra.run.dir={sys.argv[1]}"])
    except SystemExit as exit_:
        print("exit:", exit_.code)
    print("train:", [name for name in heavy if name in sys.modules])
""")


def test_config_only_paths_import_neither_torch_nor_transformers(tmp_path):
    """Composing and checking a config (and the CLI's parser) import no torch, and a training command line with a
    bad value is refused before importing torch: torch, transformers, torch.distributed.checkpoint and torch._dynamo
    take seconds to import, which every refused command line would otherwise cost (package __init__ files import
    nothing, and the config modules import no heavy module)."""
    result = subprocess.run([sys.executable, "-c", CONFIG_ONLY, str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "config: []" in result.stdout and "exit: 2" in result.stdout, result.stdout + result.stderr
    assert "train: []" in result.stdout, result.stdout
    assert "error: trainer.max_steps=-1 must be > 0" in result.stderr


def test_submit_and_plan_compose_a_config_dir_file_before_the_shipped_preset(tmp_path):
    """#21 §2: `fsdp-kit submit --config-dir DIR` pickles the overrides (with DIR as hydra.searchpath) and composes
    them on the node with compose_job: DIR/cluster/h100.yaml must win there, and be named."""
    from fsdp_kit.config import compose_with_origins, search_path_override
    from fsdp_kit.launch.submit import TrainJob

    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "h100.yaml").write_text("name: h100\ngpus_per_node: 1\ngpu_memory_gb: 40\n")
    overrides = TrainJob([search_path_override(str(tmp_path)), "cluster=h100"]).overrides
    job, origins = compose_with_origins(overrides)
    assert job.cluster.gpu_memory_gb == 40 and origins["cluster=h100"] == str(tmp_path / "cluster" / "h100.yaml")
    assert origins["model=t5_tiny"] == "shipped"
    assert compose_with_origins(["cluster=h100"])[0].cluster.gpu_memory_gb == 80  # without DIR: the shipped one


def test_environment_values_keep_their_config_text_in_what_is_written(tmp_path, monkeypatch):
    """#21 §3 in detail: copies keep the config text, numbers from the environment stay numbers, a default after
    the comma becomes the shell's, and settings an #SBATCH line holds refuse the environment."""
    import dataclasses

    from fsdp_kit.config import compose_job, to_dict, to_yaml
    from fsdp_kit.launch.sbatch import directives, render

    monkeypatch.setenv("TOKEN_X", "s3cr3t-value")
    monkeypatch.setenv("NODES_X", "3")
    job = dataclasses.replace(compose_job(["slurm.setup=${oc.env:TOKEN_X}", "cluster.nodes=${oc.env:NODES_X}",
                                           "slurm.output_root=${oc.env:NO_SUCH_VAR_X,/scratch}"]), run_dir="x")
    assert job.slurm.setup == "s3cr3t-value" and job.cluster.nodes == 3  # the job itself gets the values
    assert "s3cr3t" not in to_yaml(job) and to_dict(job)["slurm"]["setup"] == "${oc.env:TOKEN_X}"
    text = render(job, [])
    assert "SETUP='\"${TOKEN_X}\"'" in text and 'OUTPUT_ROOT="${NO_SUCH_VAR_X-/scratch}"' in text
    assert "s3cr3t" not in text
    with pytest.raises(ConfigError, match=r"slurm.partition reads the environment \(\$\{oc.env:TOKEN_X\}\)"):
        directives(compose_job(["slurm.partition=${oc.env:TOKEN_X}"]))


def test_each_component_config_checks_its_own_fields():
    from fsdp_kit.launch.config import SlurmConfig
    from fsdp_kit.optim.config import OptimConfig
    from fsdp_kit.training.config import TrainerConfig

    with pytest.raises(ConfigError, match=r"^trainer\.clip_grad_norm=0\.0 must be > 0 \(null turns clipping off\)"):
        TrainerConfig(clip_grad_norm=0.0).check()
    with pytest.raises(ConfigError, match=r"^slurm\.rdzv_port=70000 must be a port number in 1-65535\. Fix: pass "
                                          r"slurm\.rdzv_port=<1-65535>"):
        SlurmConfig(rdzv_port=70000).check()
    with pytest.raises(ConfigError, match=r"^optim\.betas=\[0\.9, 1\.0\] must be two numbers in \[0, 1\)"):
        OptimConfig(betas=[0.9, 1.0]).check()
    OptimConfig().check()  # the defaults pass
