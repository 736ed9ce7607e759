"""The demo: a small LLaMA trained on the Python standard library's own source.

The corpus exists on every machine with Python: evo trains a byte-level BPE of 4096 tokens on the
stdlib's first 300 ``.py`` files (tests left out), tokenizes them once into ``data/stdlib-bpe``
(train and held-out splits by file), then trains for a couple of minutes on a CPU, reports the
held-out loss in bits per byte and ends with a sampled continuation of a prompt.

    evo train experiments/tiny.py
    evo train experiments/tiny.py --set steps=20 --set data.seq_len=128
"""
from evo import Experiment, Plan, data, models, optim

corpus = "data/stdlib-bpe"
train_folder, valid_folder = data.build_stdlib_corpus(corpus, vocab_size=4096, tests=False,
                                                      max_files=300)

model = models.llama.Config(vocab_size=4096, hidden_size=192, num_layers=4, num_heads=6,
                            num_kv_heads=2, intermediate_size=512, max_seq_len=1024)
experiment = Experiment(
    model=model,
    data=data.Packed(folder=train_folder, valid_folder=valid_folder, seq_len=256, micro_batch=4,
                     micro_num=1, seed=0),
    optimizer=optim.adamw(lr=optim.warmup_cosine(peak=1e-3, warmup=0.1, floor=1e-4),
                          weight_decay=0.1, clip_norm=1.0),
    plan=Plan(dp=-1, tp=1, zero=0),
    steps=400,
    log_every=25,
    eval_every=100,
    eval_batches=8,
    run_dir="runs/tiny",
    tokenizer=f"{corpus}/tokenizer.json",
    sample_prompt="def fibonacci(n):\n",
    sample_tokens=120,
    sample_temperature=0.6,
)
