"""Scoring pool images with a teacher and choosing which to keep (DFND, CVPR 2021)."""
from .policies import POLICIES
from .run import SelectConfig, SelectResult, merge_shards, select_pool
from .scores import SCORERS

__all__ = ["POLICIES", "SCORERS", "SelectConfig", "SelectResult", "merge_shards", "select_pool"]
