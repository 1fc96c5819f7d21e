"""Which submodules become their own FSDP unit (communication group) before the root.

transformer: every layer of the given classes (what FSDP1's transformer_auto_wrap_policy did).
size: modules grouped bottom-up until ``min_num_params`` (FSDP1's size_based_auto_wrap_policy), never
cutting a tied parameter away from a module that shares it, and never a container without forward.
none: no units; the root holds everything.
"""

from __future__ import annotations

from torch import nn

from fsdp_kit.models.build import layers
from fsdp_kit.policies.config import WrapConfig, WrapPolicy

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def fsdp_units(model: nn.Module, cfg: WrapConfig, layer_cls: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """Submodules to ``fully_shard`` before the root, bottom-up."""
    if cfg.policy == WrapPolicy.none:
        return []
    if cfg.policy == WrapPolicy.transformer:
        return layers(model, layer_cls)
    return _size_units(model, cfg.min_num_params)


def _size_units(model: nn.Module, min_num_params: int) -> list[nn.Module]:
    holders: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(id(module))
    units: list[nn.Module] = []
    assigned: set[int] = set()

    def visit(module: nn.Module) -> set[int]:
        """Ids of the modules in this subtree; wraps the subtree when it is big enough and self-contained."""
        subtree = {id(module)}
        for child in module.children():
            subtree |= visit(child)
        if module is model or isinstance(module, _CONTAINERS):
            return subtree
        params = {id(p): p for p in module.parameters() if id(p) not in assigned}
        if sum(p.numel() for p in params.values()) < min_num_params:
            return subtree
        if any(not holders[pid] <= subtree for pid in params):
            return subtree  # a parameter tied to a module outside: the unit would split it
        units.append(module)
        assigned.update(params)
        return subtree

    visit(model)
    return units
