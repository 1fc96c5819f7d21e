"""Build a model on the meta device, then fill its local shards with weights."""

from typing import TYPE_CHECKING

from fsdp_kit._lazy import export_lazily

__all__ = ["build", "check_fits", "hf_config", "layer_classes", "materialize", "token_loss"]

# Imported on first use (fsdp_kit/_lazy.py): models.config alone must not import torch or transformers.
# models.build and models.materialize stay the functions, also once their submodules are imported.
export_lazily(__name__, {"build": "build", "check_fits": "build", "hf_config": "build", "layer_classes": "build",
                         "materialize": "materialize", "token_loss": "objective"})

if TYPE_CHECKING:
    from fsdp_kit.models.build import build, check_fits, hf_config, layer_classes
    from fsdp_kit.models.materialize import materialize
    from fsdp_kit.models.objective import token_loss
