"""The MoE demo: a small Mixtral (4 layers of 8 experts, top-2) trained on the Python standard library's own
source, as ``experiments/tiny.py`` does for LLaMA (the same corpus, tokenizer and held-out split).

Every layer's MLP is a mixture of 8 SwiGLU experts of which each token runs 2, balanced by the
Switch load-balancing loss (``aux_loss_coef``); metrics.jsonl records each layer's expert load
(max over mean) and the balancing loss under ``moe``.

    evo train experiments/tiny_moe.py
    evo train experiments/tiny_moe.py --set steps=20 --set model.bias_update_rate=0.001
"""
from evo import Experiment, Plan, data, models, optim

corpus = "data/stdlib-bpe"
train_folder, valid_folder = data.build_stdlib_corpus(corpus, vocab_size=4096, tests=False,
                                                      max_files=300)

model = models.mixtral.Config(vocab_size=4096, hidden_size=192, num_layers=4, num_heads=6,
                              num_kv_heads=2, intermediate_size=256, num_experts=8, top_k=2,
                              tie_embeddings=True, aux_loss_coef=0.01, max_seq_len=1024)
experiment = Experiment(
    model=model,
    data=data.Packed(folder=train_folder, valid_folder=valid_folder, seq_len=256, micro_batch=4,
                     micro_num=1, seed=0),
    optimizer=optim.adamw(lr=optim.warmup_cosine(peak=1e-3, warmup=0.05, floor=4e-4),
                          weight_decay=0.1, clip_norm=1.0),
    plan=Plan(dp=-1, tp=1, zero=0),
    steps=400,
    log_every=25,
    eval_every=100,
    eval_batches=8,
    run_dir="runs/tiny_moe",
    tokenizer=f"{corpus}/tokenizer.json",
    sample_prompt="def fibonacci(n):\n",
    sample_tokens=120,
    sample_temperature=0.6,
)
