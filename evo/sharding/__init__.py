"""Sharding: plans (data), meshes, and the planner that distributes a step."""
from evo.sharding.plan import Plan
from evo.sharding.planner import shard

__all__ = ["Plan", "shard"]
