"""Model FLOPs per batch, counted by torch's FlopCounterMode on a meta-device copy of the model.

Counting on meta (fake tensors) costs no memory and no compute (about 2 s for T5-3B) and counts exactly
what the model does in forward and backward; it never counts activation recompute (those are not model
FLOPs), and it avoids CPU attention kernels that have no FLOP formula. One count per model and batch shape in a
process (``COUNTED``), however many runs it makes (``fsdp-kit bench``, the tests' forked ranks).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PretrainedConfig

from fsdp_kit.models.build import build, traceable
from fsdp_kit.models.config import ModelConfig
from fsdp_kit.models.objective import token_loss
from fsdp_kit.torch_private import fake_mode

COUNTED: dict[tuple, int] = {}
"""FLOPs by (model settings, HF config, batch shapes), for this process and the processes forked from it. The count
is a function of these alone (the model is rebuilt from them on meta), so a second run of the same model and
shapes, e.g. each lever of ``fsdp-kit bench``, does not count again (T5-3B: about 2 s each time)."""


class FlopCounter:
    def __init__(self, model_cfg: ModelConfig, config: PretrainedConfig) -> None:
        self._model = traceable(build(model_cfg, device="meta", config=config))
        self._key = (repr(model_cfg), type(config).__name__, config.to_json_string(use_diff=False))
        self._cache: dict[tuple, int] = {}

    def flops(self, batch: dict[str, torch.Tensor]) -> int:
        """Forward + backward FLOPs of one training step on ``batch`` (shapes only)."""
        return self.flops_for_shapes({name: tuple(tensor.shape) for name, tensor in batch.items()})

    def flops_for_shapes(self, shapes: dict[str, tuple[int, ...]]) -> int:
        key = tuple(sorted(shapes.items()))
        if key not in self._cache:
            counted = (*self._key, key)
            if counted not in COUNTED:
                COUNTED[counted] = self._count(shapes)
            self._cache[key] = COUNTED[counted]
        return self._cache[key]

    def _count(self, shapes: dict[str, tuple[int, ...]]) -> int:
        counter = FlopCounterMode(display=False)
        # Fake tensors on meta: no memory, no compute, and HF skips its value-reading checks for them.
        with fake_mode():
            fake_batch = {name: torch.zeros(shape, dtype=torch.long, device="meta") for name, shape in shapes.items()}
            with counter:
                loss_sum, _ = token_loss(self._model, fake_batch)
                loss_sum.backward()
        self._model.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())
