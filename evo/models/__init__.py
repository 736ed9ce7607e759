"""Model families. Each module holds a frozen ``Config`` and pure ``init``, ``axes`` and ``apply``."""
from evo.models import llama

__all__ = ["llama"]
