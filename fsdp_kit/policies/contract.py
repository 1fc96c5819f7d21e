"""The precision contract: for each ``precision`` preset, the dtype of every copy of the numbers training keeps.

One table (``CONTRACT``), written down as data; README's table is generated from it (``markdown_table``), the
trainer checks a run against it after its first optimizer step (``PrecisionProbe``) and writes what it found to
``<run_dir>/precision.json``, and tests/test_precision_contract.py checks every preset and every AnyPrecision
dtype combination, the checkpoint and the export against it.

Roles: ``stored`` the sharded parameters (what the optimizer updates); ``compute`` the parameters forward and
backward see (FSDP2's all-gathered ``param_dtype``); ``reduce`` the gradient reduce-scatter; ``grad`` the sharded
gradients the optimizer reads; ``master`` an fp32 copy beside lower-precision compute (FSDP2 keeps none of its own:
with mixed precision the stored shards are the master weights); ``checkpoint`` what DCP saves (the stored shards and
the optimizer states as they are); ``export`` what ``fsdp-kit export`` writes without ``--dtype`` (the stored
dtype: the export builds the model in the dtype its recorded HF config names, which is the one training built it in).

Modules a HF model keeps in fp32 (``_keep_in_fp32_modules``: T5's ``wo``, which overflows in fp16/bf16 on large
T5s) get their own FSDP unit with an fp32 policy under the mixed presets (``keep_fp32`` rows). Under ``bf16_pure``
they are stored in bf16, as ``from_pretrained(dtype=torch.bfloat16)`` loads them (transformers keeps them fp32
only when loading in float16): pure bf16 means every weight is bf16.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fsdp_kit.optim.config import OptimConfig, OptimizerName, StateDtype
from fsdp_kit.policies.config import Precision
from fsdp_kit.torch_private import CHECKPOINT_WRAPPER_PREFIX, direct_parameters, fsdp_params

ROLES = ("stored", "compute", "reduce", "grad", "master")
"""The roles a run shows after its first step (checkpoint and export come from files, see ``FILE_ROLES``)."""
FILE_ROLES = ("checkpoint", "export")
KEEP_FP32 = "keep_fp32"
"""The row of the modules named by the model's ``_keep_in_fp32_modules``."""

F32, BF16, F16 = "float32", "bfloat16", "float16"


@dataclass(frozen=True)
class Row:
    stored: str
    compute: str
    reduce: str
    master: str | None

    @property
    def grad(self) -> str:
        return self.stored  # FSDP2 casts the reduced gradient to the sharded parameter's dtype

    def roles(self) -> dict[str, str | None]:
        return {
            "stored": self.stored,
            "compute": self.compute,
            "reduce": self.reduce,
            "grad": self.grad,
            "master": self.master,
            "checkpoint": self.stored,
            "export": self.stored,
        }


# The contract. keep_fp32: the _keep_in_fp32_modules' own row (None: the same as the model's).
CONTRACT: dict[Precision, tuple[Row, Row | None]] = {
    Precision.fp32: (Row(F32, F32, F32, None), None),
    Precision.bf16: (Row(F32, BF16, F32, F32), Row(F32, F32, F32, None)),
    Precision.fp16: (Row(F32, F16, F32, F32), Row(F32, F32, F32, None)),
    Precision.bf16_pure: (Row(BF16, BF16, BF16, None), None),
}


def optimizer_states(optim: OptimConfig, stored: str) -> dict[str, str]:
    """The dtype of each optimizer state of a parameter stored in ``stored``."""
    if optim.name == OptimizerName.anyprecision:
        states = {"exp_avg": str(optim.momentum_dtype), "exp_avg_sq": str(optim.variance_dtype)}
        if optim.use_kahan_summation:
            states["compensation"] = str(optim.compensation_buffer_dtype)
        return states
    return {"exp_avg": stored, "exp_avg_sq": stored}  # torch AdamW: zeros_like(param)


def expected(precision: Precision, optim: OptimConfig, keep_fp32: bool) -> dict[str, dict[str, str | None]]:
    """The contract's rows for one run: {"model": roles, "keep_fp32": roles (if the model has such modules)}."""
    main, keep = CONTRACT[precision]
    rows = {"model": main} | ({KEEP_FP32: keep or main} if keep_fp32 else {})
    return {
        group: {**row.roles(), **{f"optimizer.{k}": v for k, v in optimizer_states(optim, row.stored).items()}}
        for group, row in rows.items()
    }


def markdown_table(optim_presets: Iterable[tuple[str, OptimConfig]]) -> str:
    """README's table: one line per preset (and per optimizer), one column per role."""
    head = [
        "precision",
        "optim",
        "stored",
        "compute",
        "reduce",
        "grad",
        "optimizer states",
        "master",
        "checkpoint",
        "export",
        "`_keep_in_fp32_modules` (T5 `wo`)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for precision, (main, keep) in CONTRACT.items():
        for label, optim in optim_presets:
            states = optimizer_states(optim, main.stored)
            roles = main.roles()
            kept = (
                "as the model"
                if keep is None
                else f"stored {keep.stored}, compute {keep.compute}, reduce {keep.reduce} (own FSDP unit)"
            )
            cells = [
                precision.value,
                label,
                *(roles[k] for k in ("stored", "compute", "reduce", "grad")),
                ", ".join(f"{k} {v}" for k, v in states.items()),
                roles["master"] or "none",
                roles["checkpoint"],
                roles["export"],
                kept,
            ]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


# -- what a run shows -----------------------------------------------------------------------------------------
def keep_fp32_names(model: nn.Module) -> set[str]:
    """The names HF keeps in fp32 (``_keep_in_fp32_modules``; transformers matches them per name component)."""
    return set(getattr(model, "_keep_in_fp32_modules", None) or ())


def clean_name(name: str) -> str:
    """A module's name as the user's model spells it (without the AC and compile wrappers' parts)."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "").replace("_orig_mod.", "")


def group_of(name: str, keep: set[str]) -> str:
    return KEEP_FP32 if keep & set(clean_name(name).split(".")) else "model"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class PrecisionProbe:
    """Watches the first optimizer step of a run and records the dtype of every role, per group of parameters.

    Forward pre-hooks see the parameters as forward does (FSDP2 has all-gathered them in ``param_dtype``); an
    optimizer step post-hook sees the gradients and the fresh optimizer states before ``zero_grad``. Both are
    removed once the step is seen: later steps pay nothing."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.keep = keep_fp32_names(model)
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.seen: dict[str, dict[str, set[str]]] = {}
        self.done = False
        self._handles = [
            module.register_forward_pre_hook(self._compute(name))
            for name, module in model.named_modules()
            if any(direct_parameters(module))
        ]
        self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _add(self, name: str, role: str, dtype: str) -> None:
        self.seen.setdefault(group_of(name, self.keep), {}).setdefault(role, set()).add(dtype)

    def _compute(self, module_name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, _args: Any) -> None:
            for name, param in direct_parameters(module):
                if param is not None and param.is_floating_point():
                    self._add(f"{module_name}.{name}", "compute", _dtype(param))

        return hook

    def _after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        reduce = reduce_dtypes(self.model)
        for param in (p for group in optimizer.param_groups for p in group["params"]):
            name = self.names.get(id(param), "?")
            stored = _dtype(_local(param))
            self._add(name, "stored", stored)
            if param.grad is not None:
                self._add(name, "grad", _dtype(_local(param.grad)))
            self._add(name, "reduce", reduce.get(id(param), stored))
            for key, value in optimizer.state[param].items():
                if key != "step" and isinstance(value, torch.Tensor):
                    self._add(name, f"optimizer.{key}", _dtype(value))
        for roles in self.seen.values():  # master weights: the stored shards, where compute is lower precision
            compute = roles.get("compute", set())
            roles["master"] = roles["stored"] if compute and compute != roles["stored"] else {"None"}
        self.done = True
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def observed(self) -> dict[str, dict[str, str | None]]:
        """{group: {role: dtype}}; a role holding two dtypes in one group reads "float32+bfloat16"."""
        return {
            group: {
                role: None if dtypes == {"None"} else "+".join(sorted(dtypes)) for role, dtypes in sorted(roles.items())
            }
            for group, roles in sorted(self.seen.items())
        }


def reduce_dtypes(model: nn.Module) -> dict[int, str]:
    """The dtype each parameter's gradient is reduced in, as FSDP2 set it up: its ``reduce_dtype``, else its
    ``param_dtype``, else the stored dtype (FSDP2 stores None where no cast is needed). FSDP2 has no public reader
    of its per-parameter policy; these attributes have been stable since torch 2.4."""
    found: dict[int, str] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for fsdp_param in fsdp_params(module):
            dtype = fsdp_param.reduce_dtype or fsdp_param.param_dtype or fsdp_param.orig_dtype
            found[id(fsdp_param.sharded_param)] = str(dtype).removeprefix("torch.")
    return found


def compare(want: dict[str, dict[str, str | None]], got: dict[str, dict[str, str | None]]) -> list[str]:
    """The roles where a run differs from the contract, as "group.role: expected X, found Y"."""
    problems = []
    for group in sorted(set(want) | set(got)):
        expected_roles, found = want.get(group, {}), got.get(group, {})
        for role in sorted(set(expected_roles) | set(found)):
            if role in FILE_ROLES:
                continue
            if expected_roles.get(role) != found.get(role):
                problems.append(f"{group}.{role}: expected {expected_roles.get(role)}, found {found.get(role)}")
    return problems


def write_report(path: Path, precision: Precision, want: dict, got: dict, problems: list[str]) -> None:
    path.write_text(
        json.dumps(
            {
                "precision": precision.value,
                "expected": want,
                "observed": got,
                "matches": not problems,
                "differences": problems,
            },
            indent=2,
        )
        + "\n"
    )


README_OPTIMIZERS = (
    ("adamw", OptimConfig()),
    (
        "anyprecision",
        OptimConfig(
            name=OptimizerName.anyprecision,
            use_kahan_summation=True,
            momentum_dtype=StateDtype.bfloat16,
            variance_dtype=StateDtype.bfloat16,
            compensation_buffer_dtype=StateDtype.bfloat16,
        ),
    ),
)
"""The optimizers README's table shows: torch AdamW, and AnyPrecision as configs/optim/anyprecision.yaml sets it."""

if __name__ == "__main__":  # README's table: python -m fsdp_kit.policies.contract
    print(markdown_table(README_OPTIMIZERS))
