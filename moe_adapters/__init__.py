"""moe-adapters: Mixture-of-Experts checkpoints between the Hugging Face layout and fused, expert-parallel layouts,
bit for bit, and the runtime that trains on them."""

from __future__ import annotations

import os as _os

# A source checkout keeps families/, converters/ and cli.py beside this package (the repository's layout); a wheel
# installs them inside it. Adding the checkout root to the package path makes both import as moe_adapters.<name>.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "families")):
    __path__.append(_root)  # type: ignore[name-defined]

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: importing the converter must not import torch/transformers
    if name == "AutoModelForCausalLM":
        from .runtime.integration import AutoModelForCausalLM

        return AutoModelForCausalLM
    raise AttributeError(name)
