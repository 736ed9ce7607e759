"""One process of the plan-equivalence sweep over the family defined in experiments/gelu_mlp.py
(launched by tests/test_families.py under torchrun, 4 processes): each plan against the
single-process step on the same global batches (tests/sweep_worker.py's), 3 steps; rank 0 writes
the largest relative differences and the measured communication bytes."""
import datetime
import importlib.util
import json
import os
import sys

import torch.distributed as dist

from evo import data, models, optim, train, tree
from evo.sharding import Plan
from families_tp_worker import check
from sweep_worker import SOURCES, global_batches

# AdamW at the learning rate the tolerances of test_families.py were set for (the main sweep moves
# faster and judges each update against its own size)
OPT = optim.adamw(lr=optim.warmup_cosine(peak=1e-3, warmup=1, total_steps=3), weight_decay=0.1,
                  clip_norm=1.0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4,
              intermediate_size=48)
PLANS = [("dp2-tp2-zero3", Plan(dp=2, tp=2, zero=3), 4),
         ("tp2-sp", Plan(dp=1, tp=2, sequence_parallel=True), 2),
         ("dp4-zero3-group2", Plan(dp=4, zero=3, zero_group=2), 4)]


def gelu_config():
    data.build_stdlib_corpus = lambda folder: ("unused/train", "unused/valid")  # the family only
    spec = importlib.util.spec_from_file_location(
        "gelu_mlp", os.path.join(REPO, "experiments", "gelu_mlp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GeluConfig(**FIELDS)


def main(out_path):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    cfg = gelu_config()
    batches = global_batches(cfg.vocab_size)
    params0 = models.init(cfg, seed=0)
    ref, ref_losses = train.init_state(tree.clone(params0), OPT), []
    for b in batches:
        ref, m = train.Step(cfg, OPT, sources=SOURCES)(ref, b)
        ref_losses.append(float(m["loss"]))
    results = {}
    for name, plan, world in PLANS:
        r = check(cfg, plan, world, batches, (params0, ref, ref_losses), OPT)
        if r is not None and dist.get_rank() == 0:
            results[name] = r
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"family": models.family_of(cfg).name, "plans": results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
