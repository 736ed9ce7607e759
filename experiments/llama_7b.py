"""LLaMA-2 7B shape on random tokens: for `evo plan --search` at cluster scale (no data needed).

    evo plan experiments/llama_7b.py --world 1024 --search --profile h100-80gb-ib
"""
from evo import Experiment, Plan, data, models, optim

experiment = Experiment(
    model=models.llama.Config(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                              intermediate_size=11008, max_seq_len=4096),
    data=data.Packed(folder=None, seq_len=4096, micro_batch=1, micro_num=4),
    optimizer=optim.adamw(lr=3e-4, weight_decay=0.1),
    plan=Plan(dp=-1),
    compute_dtype="bfloat16",
    run_dir="runs/llama_7b",
)
