import os
import sys

# Test helpers (e.g. the distributed sweep's worker) import each other by module name.
sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run on a CPU under Triton's interpreter, which must be chosen before anything
# imports triton (transformers does, through torch._dynamo), so it is set here, first.
import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every core already runs a worker: one compute thread per worker and per
# process it starts (torch's default, a thread per core, oversubscribes the cores: two 30-step
# demo trainings side by side took 44 s with two threads each, 23 s with one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The files that take longest (each over a minute on a 2-core machine), longest first: pytest-xdist
# hands files to its workers in collection order, and a long file started last is the suite's tail.
LONGEST_FIRST = ("test_demo.py", "test_docs.py", "test_sharding.py", "test_checkpoint.py",
                 "test_hf_families.py", "test_torchrun.py", "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first, the rest in their usual order (a stable sort: each file's tests
    keep theirs). Without a GPU, a test marked ``cuda`` is skipped unless ``cuda(cpu=True)``."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            mark = item.get_closest_marker("cuda")
            if mark is not None and not mark.kwargs.get("cpu", False):
                item.add_marker(skip)


def repo_env(**extra: str) -> dict[str, str]:
    """The environment of every subprocess a test starts: this repository first on PYTHONPATH
    (it supplies both ``evo`` and ``evo_kernels``, ahead of any installed or other checkout),
    then ``extra`` (e.g. ``OMP_NUM_THREADS="1"`` where a test runs several processes)."""
    path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}
