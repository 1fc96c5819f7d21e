"""fsdp_kit: train large HF models with PyTorch FSDP2 from a config.

Vocabulary, the same in every module:

- ``job``: the whole run's config, a :class:`fsdp_kit.config.TrainConfig` (model, data, policies, optimizer,
  trainer, checkpoint, metrics, launcher). Only the entry points (``train.run``, the CLI, ``plan``, ``bench``) take
  it; what they call takes the parts it uses.
- ``cfg``: one component's config, e.g. a ``TrainerConfig`` or a ``CheckpointConfig`` (``job.trainer``,
  ``job.checkpoint``).
- ``hf_config`` (``config`` where no other config is in scope): the model's own transformers ``PretrainedConfig``
  (layer count, widths, vocabulary), never ours.
- ``env``: the process's place in the job (``fsdp_kit.distributed.DistEnv``: rank, world size, device, mesh).
- ``run_dir``: the folder a run writes everything to; ``resolved_config.yaml`` there holds the values it ran with.
"""

__version__ = "0.1.0"
