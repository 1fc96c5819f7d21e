"""Held-out loss and greedy-generation accuracy, the same on every rank."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method

from fsdp_kit.data.loader import DataBundle
from fsdp_kit.distributed import DistEnv
from fsdp_kit.metrics.report import Reporter
from fsdp_kit.models.objective import token_loss
from fsdp_kit.policies.apply import reshard_all
from fsdp_kit.training.config import TrainerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Evaluator:
    def __init__(
        self, model: nn.Module, data: DataBundle, cfg: TrainerConfig, env: DistEnv, reporter: Reporter
    ) -> None:
        self.model, self.data, self.cfg, self.env, self.reporter = model, data, cfg, env, reporter
        self._generate_registered = False

    @torch.no_grad()
    def evaluate(self, step: int, generate: bool) -> dict[str, Any]:
        """Mean token loss over ``eval_batches`` batches per rank; with ``generate``, exact-match accuracy too."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        loader = self.data.eval_loader(self.cfg.batch_size, self.env.rank, self.env.world_size)
        for index, micro in enumerate(loader):
            if index == self.cfg.eval_batches:
                break
            batch = {k: v.to(self.env.device) for k, v in micro.items()}
            loss_sum, count = token_loss(self.model, batch)
            totals += torch.stack([loss_sum.double(), count.double()])
        if self.env.world_size > 1:
            dist.all_reduce(totals)
        record: dict[str, Any] = {"step": step, "eval_loss": float(totals[0] / totals[1].clamp(min=1))}
        if generate and self.data.eval_pairs is not None:
            record["exact_match"] = self.exact_match()
        self.model.train()
        reshard_all(self.model)  # eval/generate run forward only
        self.reporter.eval(record)
        return record

    def exact_match(self) -> float:
        """Greedy generation on the held-out split; every rank runs the same number of batches."""
        if not self._generate_registered:
            register_fsdp_forward_method(self.model, "generate")  # generate() must unshard like forward()
            self._generate_registered = True
        pairs, size = self.data.eval_pairs or [], self.cfg.batch_size
        max_new_tokens = self.cfg.max_new_tokens or self.data.cfg.max_target_len
        per_round = size * self.env.world_size
        hits = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for start in range(0, len(pairs), per_round):
            mine = list(range(start + self.env.rank * size, min(start + (self.env.rank + 1) * size, len(pairs))))
            indices = mine or [0]  # keep collectives in step; the stand-in is not counted
            prompts = self.data.collate.prompts([self.data.eval[i] for i in indices], self.env.device)
            output: torch.Tensor = cast(Any, self.model).generate(  # HF's generate: loosely typed
                **prompts,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                synced_gpus=self.env.world_size > 1,
            )
            if not cast("PreTrainedModel", self.model).config.is_encoder_decoder:
                output = output[:, prompts["input_ids"].shape[1] :]
            texts = self.data.tokenizer.batch_decode(output, skip_special_tokens=True)
            for i, text in zip(mine, texts):
                hits[0] += float(text.strip() == self.trained_target(i))
            hits[1] += len(mine)
        if self.env.world_size > 1:
            dist.all_reduce(hits)
        return float(hits[0] / hits[1].clamp(min=1))

    def trained_target(self, index: int) -> str:
        """The held-out target as the model was trained to produce it: tokenized and cut to data.max_target_len,
        then decoded. Comparing with the full text would score a perfectly learned task 0 whenever targets are
        longer than the limit."""
        ids = self.data.eval[index]["target"]
        return str(self.data.tokenizer.decode(ids, skip_special_tokens=True)).strip()
