"""AnyPrecisionAdamW: AdamW with a dtype per state and optional Kahan-compensated updates.

A drop-in for torchdistx's AnyPrecisionAdamW (same constructor arguments and defaults), which is no
longer installable. With bf16 weights, an update smaller than half a bf16 ulp of the weight rounds away
and training stagnates; Kahan summation keeps the lost low bits in a compensation buffer and adds them
back on later steps, so pure-bf16 training tracks fp32.

Where this departs from torchdistx (each a fix; with fp32 states and Kahan off it still equals
``torch.optim.AdamW``):

- With ``use_kahan_summation`` the decoupled weight decay (``-lr * weight_decay * p``) is added to the
  compensated sum with the Adam update. torchdistx multiplies the weight by ``1 - lr * weight_decay``
  first, outside the compensation, so in bf16 any decay below half an ulp of the weight is lost.
- The denominator ``sqrt(v_hat) + eps`` is formed in a dtype that can hold ``eps``: the variance dtype if
  it can, else the parameter dtype, else float32 (per chunk). torchdistx forms it in the variance dtype, so
  with float16 variance ``eps=1e-8`` is 0 and a zero gradient gives 0/0 = NaN. (float16 variance stays a
  poor choice: ``(1 - beta2) * g^2`` underflows to 0 for ``|g|`` below ~5e-3, and the update becomes
  ``m / eps``; the constructor warns and fsdp_kit's config refuses it.)
- ``step()`` never reads a tensor's value back to the host: each parameter's step count is mirrored in a
  host integer (the saved ``state["step"]`` tensors are bumped with one multi-tensor add per group and read
  only by ``load_state_dict``), so there is no per-parameter ``.item()`` and no synchronization.
- ``load_state_dict`` restores every state tensor in the dtype it was saved with; torch's default casts
  state to the parameter dtype (a bf16 variance became fp32 under fp32 weights, an fp32 momentum bf16
  under bf16 weights), so a resumed run differed from an uninterrupted one.

The math runs as multi-tensor (``torch._foreach_*``) calls over chunks of about ``chunk_elements``
elements: one call per chunk, not a Python loop over parameters, and temporaries bounded by the chunk
(one multi-tensor call over all of T5-11B's parameters needs ~45 GB more memory). Works on plain tensors
and on FSDP2's sharded DTensor parameters (the math runs on the local shards); its state saves through
torch.distributed.checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

CHUNK_NUMEL = 128 * 1024 * 1024
"""Default elements per multi-tensor call: bounds the optimizer's temporaries (T5-11B fits one H200)."""


class AnyPrecisionAdamW(Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_kahan_summation: bool = False,
        momentum_dtype: torch.dtype = torch.float32,
        variance_dtype: torch.dtype = torch.bfloat16,
        compensation_buffer_dtype: torch.dtype = torch.bfloat16,
        chunk_elements: int = CHUNK_NUMEL,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if chunk_elements < 1:
            raise ValueError(f"Invalid chunk_elements value: {chunk_elements}")
        if variance_dtype == torch.float16:
            # (1 - beta2) * g^2 rounds to 0 in float16 for |g| below ~5e-3 (beta2=0.999): the update is then
            # m / eps. Accepted for torchdistx compatibility; fsdp_kit's config refuses it.
            warnings.warn(
                "AnyPrecisionAdamW variance_dtype=float16: the second moment underflows for small "
                "gradients and those updates blow up; use bfloat16",
                stacklevel=2,
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "use_kahan_summation": use_kahan_summation,
            "momentum_dtype": momentum_dtype,
            "variance_dtype": variance_dtype,
            "compensation_buffer_dtype": compensation_buffer_dtype,
        }
        super().__init__(params, defaults)
        # Not a group hyperparameter: it changes speed and peak memory, never the result, so it stays out
        # of the state dict (checkpoints load whatever chunking the resuming run uses).
        self.chunk_elements = int(chunk_elements)
        # Host copy of each parameter's state["step"]: bias corrections need the count as a number, and
        # reading the tensor would be one host read per parameter per step.
        self._host_steps: dict[torch.Tensor, int] = {}

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)  # a CPU float32 scalar, as in torch.optim.AdamW
            self._host_steps[param] = 0
            state["exp_avg"] = torch.zeros_like(param, dtype=group["momentum_dtype"])
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=group["variance_dtype"])
            if group["use_kahan_summation"]:
                state["compensation"] = torch.zeros_like(param, dtype=group["compensation_buffer_dtype"])
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AnyPrecisionAdamW does not support sparse gradients")
            states = [self._init_state(p, group) for p in params]
            torch._foreach_add_([s["step"] for s in states], 1.0)
            steps = [self._bump_host_step(p, s) for p, s in zip(params, states)]
            for chunk in _chunks(list(zip(params, states, steps)), self.chunk_elements):
                self._update(
                    group,
                    [_local(p) for p, _, _ in chunk],
                    [_local(_grad(p)) for p, _, _ in chunk],
                    [s for _, s, _ in chunk],
                    [t for _, _, t in chunk],
                )
        return loss

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling and deepcopy restore only defaults, state and param_groups.
        super().__setstate__(state)
        self.__dict__.setdefault("chunk_elements", CHUNK_NUMEL)
        self.__dict__.setdefault("_host_steps", {})

    def _bump_host_step(self, param: torch.Tensor, state: dict) -> int:
        step = self._host_steps.get(param)
        if step is None:
            # State that arrived without load_state_dict (an unpickled or deep-copied optimizer): read the
            # tensor once; from then on the host copy is used. The tensor was bumped already.
            step = int(state["step"]) - 1
        self._host_steps[param] = step + 1
        return step + 1

    def _update(
        self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], steps: list[int]
    ) -> None:
        """One chunk: ``params`` and ``grads`` are local tensors (an FSDP2 shard's own elements)."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [_local(s["exp_avg"]) for s in states]
        exp_avg_sqs = [_local(s["exp_avg_sq"]) for s in states]
        grads_m = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
        grads_v = [g if g.dtype == v.dtype else g.to(v.dtype) for g, v in zip(grads, exp_avg_sqs)]
        torch._foreach_lerp_(exp_avgs, grads_m, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads_v, grads_v, 1.0 - beta2)
        del grads_m, grads_v

        step_sizes = [-lr / (1.0 - beta1**step) for step in steps]
        denom_dtype = _denominator_dtype(exp_avg_sqs[0].dtype, params[0].dtype, eps)
        if denom_dtype == exp_avg_sqs[0].dtype:
            denoms = list(torch._foreach_sqrt(exp_avg_sqs))
        else:
            denoms = [v.to(denom_dtype) for v in exp_avg_sqs]  # the chunk's one temporary, sqrt in place
            torch._foreach_sqrt_(denoms)
        torch._foreach_div_(denoms, [(1.0 - beta2**step) ** 0.5 for step in steps])
        torch._foreach_add_(denoms, eps)

        if not group["use_kahan_summation"]:
            if weight_decay:
                torch._foreach_mul_(params, 1.0 - lr * weight_decay)
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
            return
        compensations = [_local(s["compensation"]) for s in states]
        # The decay joins the compensated sum: in bf16, p * (1 - lr * wd) alone rounds back to p.
        if weight_decay:
            torch._foreach_add_(compensations, params, alpha=-lr * weight_decay)
        # comp += update; p_new = p + comp; comp -= (p_new - p): what rounding dropped stays in comp.
        torch._foreach_addcdiv_(compensations, exp_avgs, denoms, step_sizes)
        del denoms
        previous = torch._foreach_mul(params, 1.0)
        torch._foreach_add_(params, compensations)
        torch._foreach_sub_(previous, params)
        torch._foreach_add_(compensations, previous)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Torch's load, then every state tensor back in the dtype it was saved with.

        ``Optimizer.load_state_dict`` casts floating state to the parameter's dtype; here the momentum,
        variance and compensation keep their saved dtypes (and values: no round trip through the
        parameter dtype). ``step`` stays a CPU float32 scalar and the host step counts are read from it,
        once per parameter here (never in ``step()``).
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[param]
            for key, value in saved.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    state[key] = value.to(dtype=torch.float32, device="cpu")
                else:
                    state[key] = value.to(device=param.device)
        with_steps = [p for p, state in self.state.items() if "step" in state]
        counts = torch.stack([self.state[p]["step"] for p in with_steps]).tolist() if with_steps else []
        self._host_steps = {p: int(count) for p, count in zip(with_steps, counts)}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The elements this rank holds; in-place ops on it update the DTensor (step() runs without grad)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _holds(dtype: torch.dtype, eps: float) -> bool:
    """Whether ``eps`` is a normal number of ``dtype`` (float16's smallest is 6e-5: 1e-8 flushes to 0)."""
    return eps == 0.0 or eps >= torch.finfo(dtype).tiny


def _denominator_dtype(variance_dtype: torch.dtype, param_dtype: torch.dtype, eps: float) -> torch.dtype:
    """The variance dtype when it holds eps (no temporary beyond sqrt's), else the parameter's, else fp32."""
    for dtype in (variance_dtype, param_dtype):
        if _holds(dtype, eps):
            return dtype
    return torch.float32


_Item = tuple[torch.Tensor, dict, int]  # parameter, its state, its step count


def _grad(param: torch.Tensor) -> torch.Tensor:
    """The gradient of a parameter that ``step`` selected for having one."""
    assert param.grad is not None
    return param.grad


def _chunks(items: list[_Item], max_numel: int) -> Iterator[list[_Item]]:
    """Consecutive groups with the same device and dtypes, each of at most ``max_numel`` elements
    (a single larger tensor forms its own group)."""
    chunk: list[_Item] = []
    numel = 0
    key = None
    for item in items:
        param, state, _ = item
        item_key = (param.device, param.dtype, _grad(param).dtype, state["exp_avg"].dtype, state["exp_avg_sq"].dtype)
        local_numel = _local(param).numel()
        if chunk and (item_key != key or numel + local_numel > max_numel):
            yield chunk
            chunk, numel = [], 0
        chunk.append(item)
        numel += local_numel
        key = item_key
    if chunk:
        yield chunk
