"""The demo: a small LLaMA trained on the Python standard library's own source, byte-level.

The corpus exists on every machine with Python: evo tokenizes the stdlib's .py files once into
``data/stdlib`` (train and held-out splits by file), then trains for a couple of minutes on a CPU
and ends with a sampled continuation of a prompt.

    evo train experiments/tiny.py
    evo train experiments/tiny.py --set steps=20 --set data.seq_len=128
"""
from evo import Experiment, Plan, data, models, optim

train_folder, valid_folder = data.build_stdlib_corpus("data/stdlib")

model = models.llama.Config(vocab_size=258, hidden_size=192, num_layers=4, num_heads=6,
                            num_kv_heads=2, intermediate_size=512, max_seq_len=1024)
experiment = Experiment(
    model=model,
    data=data.Packed(folder=train_folder, valid_folder=valid_folder, seq_len=256, micro_batch=4,
                     micro_num=1, seed=0),
    optimizer=optim.adamw(lr=optim.warmup_cosine(peak=3e-3, warmup=0.05, floor=3e-4),
                          weight_decay=0.1, clip_norm=1.0),
    plan=Plan(dp=-1, tp=1, zero=0),
    steps=300,
    log_every=25,
    eval_every=100,
    eval_batches=8,
    run_dir="runs/tiny",
    tokenizer="byte",
    sample_prompt="def fibonacci(n):\n",
    sample_tokens=160,
    sample_temperature=0.6,
)
