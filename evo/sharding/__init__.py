"""Sharding: plans (data) and, on top of them, the planner that distributes a step."""
from evo.sharding.plan import Plan

__all__ = ["Plan"]
