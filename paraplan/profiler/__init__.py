"""Measures: per-layer time, FLOPs and memory, and data links (host<->device copies, local all-reduce)."""

from paraplan.profiler.layers import profile_model
from paraplan.profiler.links import profile_allreduce, profile_links

__all__ = ["profile_allreduce", "profile_links", "profile_model"]
