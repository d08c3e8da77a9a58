"""Runtime: expert-parallel MoE layers (router, dispatcher, grouped experts) and the ``from_pretrained`` drop-in.

Nothing here is imported by the converter; it needs torch and transformers. See docs/architecture.md.
"""

from .dispatch import AllToAllDispatcher, DeepEPDispatcher, LocalDispatcher, make_dispatcher
from .experts import GroupedExperts, SharedExpertsMLP
from .layer import MoEBlock, build_moe_block
from .router import RouterSpec, TopKRouter, route

__all__ = [
    "AllToAllDispatcher",
    "DeepEPDispatcher",
    "GroupedExperts",
    "LocalDispatcher",
    "MoEBlock",
    "RouterSpec",
    "SharedExpertsMLP",
    "TopKRouter",
    "build_moe_block",
    "make_dispatcher",
    "route",
]
