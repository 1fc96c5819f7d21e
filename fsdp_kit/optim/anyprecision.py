"""AnyPrecisionAdamW: AdamW with a dtype per state and optional Kahan-compensated updates.

A drop-in for torchdistx's AnyPrecisionAdamW (same constructor arguments and defaults), which is no
longer installable. With bf16 weights, an update smaller than half a bf16 ulp of the weight rounds away
and training stagnates; Kahan summation keeps the lost low bits in a compensation buffer and adds them
back on later steps, so pure-bf16 training tracks fp32.

The math runs as multi-tensor (``torch._foreach_*``) calls over chunks of about ``CHUNK_NUMEL``
elements: one call per chunk, not a Python loop over parameters, and temporaries bounded by the chunk
(one multi-tensor call over all of T5-11B's parameters needs ~45 GB more memory). Works on plain tensors
and on FSDP2's sharded DTensor parameters; its state saves through torch.distributed.checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

CHUNK_NUMEL = 128 * 1024 * 1024


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
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameters: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
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

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, dtype=group["momentum_dtype"])
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=group["variance_dtype"])
            if group["use_kahan_summation"]:
                state["compensation"] = torch.zeros_like(param, dtype=group["compensation_buffer_dtype"])
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AnyPrecisionAdamW does not support sparse gradients")
            states = [self._init_state(p, group) for p in params]
            for state in states:
                state["step"] += 1
            for chunk in _chunks(list(zip(params, states)), CHUNK_NUMEL):
                self._update(group, [p for p, _ in chunk], [s for _, s in chunk])
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], states: list[dict]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"].item() for s in states]
        grads = [p.grad if p.grad.dtype == m.dtype else p.grad.to(m.dtype) for p, m in zip(params, exp_avgs)]
        grads_sq = [p.grad if p.grad.dtype == v.dtype else p.grad.to(v.dtype) for p, v in zip(params, exp_avg_sqs)]

        if weight_decay:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads_sq, grads_sq, 1.0 - beta2)
        del grads, grads_sq

        step_sizes = [-lr / (1.0 - beta1**step) for step in steps]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1.0 - beta2**step) ** 0.5 for step in steps])
        torch._foreach_add_(denoms, eps)

        if not group["use_kahan_summation"]:
            torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
            return
        compensations = [s["compensation"] for s in states]
        # comp += update; p_new = p + comp; comp -= (p_new - p): what rounding dropped stays in comp.
        torch._foreach_addcdiv_(compensations, exp_avgs, denoms, step_sizes)
        del denoms
        previous = torch._foreach_mul(params, 1.0)
        torch._foreach_add_(params, compensations)
        torch._foreach_sub_(previous, params)
        torch._foreach_add_(compensations, previous)


def _chunks(items: list[tuple[torch.Tensor, dict]], max_numel: int) -> Iterator[list[tuple[torch.Tensor, dict]]]:
    """Consecutive groups with the same device and dtypes, each of at most ``max_numel`` elements
    (a single larger tensor forms its own group)."""
    chunk: list[tuple[torch.Tensor, dict]] = []
    numel = 0
    key = None
    for param, state in items:
        item_key = (param.device, param.dtype, param.grad.dtype)
        local_numel = param.to_local().numel() if isinstance(param, DTensor) else param.numel()
        if chunk and (item_key != key or numel + local_numel > max_numel):
            yield chunk
            chunk, numel = [], 0
        chunk.append((param, state))
        numel += local_numel
        key = item_key
    if chunk:
        yield chunk
