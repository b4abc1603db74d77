"""paraplan: automatic parallelism planner for PyTorch training."""

from paraplan.errors import ParaplanError
from paraplan.types import ClusterSpec, ModelProfile, ModelSpec, Plan, Strategy, StrategyOverride, TrainSpec

__version__ = "0.1.0"

__all__ = [
    "ClusterSpec", "ModelProfile", "ModelSpec", "ParaplanError", "Plan", "Strategy", "StrategyOverride", "TrainSpec",
    "__version__",
]
