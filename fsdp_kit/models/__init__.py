"""Build a model on the meta device, then fill its local shards with weights."""

from fsdp_kit.models.build import build, check_fits, hf_config, layer_classes
from fsdp_kit.models.materialize import materialize
from fsdp_kit.models.objective import token_loss

__all__ = ["build", "check_fits", "hf_config", "layer_classes", "materialize", "token_loss"]
