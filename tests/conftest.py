import os
import sys

# Test helpers (e.g. the distributed sweep's worker) import each other by module name.
sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run on a CPU under Triton's interpreter, which must be chosen before anything
# imports triton (transformers does, through torch._dynamo), so it is set here, first.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_env(**extra: str) -> dict[str, str]:
    """The environment of every subprocess a test starts: this repository first on PYTHONPATH
    (it supplies both ``evo`` and ``evo_kernels``, ahead of any installed or other checkout),
    then ``extra`` (e.g. ``OMP_NUM_THREADS="1"`` where a test runs several processes)."""
    path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}
