"""A LLaMA small enough to sweep sharding plans on a CPU (gloo, 1-4 processes), large enough that
matmuls dominate its step: the experiment `evo sweep` measures in docs/plans.md.

    evo sweep experiments/plan_cpu.py --top 10 --steps 6 --nproc 4 --out sweeps/cpu --spread
"""
from evo import Experiment, Plan, data, models, optim

experiment = Experiment(
    model=models.llama.Config(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8,
                              num_kv_heads=4, intermediate_size=688, max_seq_len=256),
    data=data.Packed(folder=None, seq_len=128, micro_batch=2, micro_num=2),
    optimizer=optim.adamw(lr=3e-4, weight_decay=0.1),
    plan=Plan(dp=-1),
    compute_dtype="float32",
    steps=10,
    run_dir="runs/plan_cpu",
)
