"""evo's kernels: pure ops with a CPU reference and faster implementations behind them.

Imported as ``evo_kernels`` (the folder is ``kernels/``); model code calls these ops and never a
backend directly.
"""
from evo_kernels.attention import attention, attention_with_mask, cached_mask

__all__ = ["attention", "attention_with_mask", "cached_mask"]
