"""Model presets and the layer-chain builder."""

from paraplan.models.build import LayerChain, build_layer, build_model, count_parameters, lm_loss
from paraplan.models.presets import PRESETS, load_model_spec

__all__ = ["PRESETS", "LayerChain", "build_layer", "build_model", "count_parameters", "lm_loss", "load_model_spec"]
