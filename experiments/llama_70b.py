"""LLaMA-2 70B shape (grouped-query attention, 8 kv heads) on random tokens: for
`evo plan --search` at cluster scale (no data needed).

    evo plan experiments/llama_70b.py --world 1024 --search --profile a800-80gb-roce
"""
from evo import Experiment, Plan, data, models, optim

experiment = Experiment(
    model=models.llama.Config(vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64,
                              num_kv_heads=8, intermediate_size=28672, max_seq_len=4096),
    data=data.Packed(folder=None, seq_len=4096, micro_batch=1, micro_num=4),
    optimizer=optim.adamw(lr=1.5e-4, weight_decay=0.1),
    plan=Plan(dp=-1),
    compute_dtype="bfloat16",
    run_dir="runs/llama_70b",
)
