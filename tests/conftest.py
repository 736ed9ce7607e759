import os
import sys

# Test helpers (e.g. the distributed sweep's worker) import each other by module name.
sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run on a CPU under Triton's interpreter, which must be chosen before anything
# imports triton (transformers does, through torch._dynamo), so it is set here, first.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
