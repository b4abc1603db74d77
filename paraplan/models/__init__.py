"""Model presets, model files and the layer chain.

The chain builders need torch; they are imported on first use (PEP 562), so commands that only read presets
(``paraplan models``, ``plan`` without building a module) start without importing torch.
"""

from __future__ import annotations

from typing import Any

from paraplan.models.presets import PRESETS, load_model_spec

_BUILD = ("LayerChain", "build_layer", "build_model", "count_parameters", "init_parameter", "init_weights", "lm_loss")

__all__ = ["PRESETS", "load_model_spec", *_BUILD]


def __getattr__(name: str) -> Any:
    if name in _BUILD:
        from paraplan.models import build

        return getattr(build, name)
    raise AttributeError(f"module 'paraplan.models' has no attribute {name!r}")
