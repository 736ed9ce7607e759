"""A new model family defined in an experiment file: LLaMA with a GELU MLP.

Nothing under ``evo/`` knows this family. It subclasses the LLaMA family, overrides the two
pieces that differ — one layer's parameters (no ``w3``: the MLP is ``gelu(x w1) w2``) and the MLP
itself — and registers itself; the planner and checkpoints find it through the registry.

    evo train experiments/gelu_mlp.py --set steps=20
    torchrun --nproc-per-node 4 -m evo train experiments/gelu_mlp.py \\
        --set plan.dp=2 --set plan.tp=2 --set plan.zero=3
"""
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from evo import Experiment, Plan, data, models, optim
from evo.models import llama


@dataclass(frozen=True)
class GeluConfig(llama.Config):
    """LLaMA's fields; the family name is what checkpoints record."""
    family: ClassVar[str] = "llama_gelu"


class GeluLlama(llama.Llama):
    name = "llama_gelu"
    config = GeluConfig
    hf_architectures = ()          # no HF mapping: export-hf refuses it by name

    def layer_specs(self, cfg):
        specs = super().layer_specs(cfg)
        del specs["mlp.w3"]        # one up projection instead of SwiGLU's two
        return specs

    def mlp(self, cfg, p, h, ctx):
        return F.gelu(h @ p["mlp.w1"], approximate="tanh") @ p["mlp.w2"]


models.register(GeluLlama())

train_folder, valid_folder = data.build_stdlib_corpus("data/stdlib")
experiment = Experiment(
    model=GeluConfig(vocab_size=258, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, max_seq_len=128),
    data=data.Packed(folder=train_folder, valid_folder=valid_folder, seq_len=64, micro_batch=2,
                     micro_num=2, seed=0),
    optimizer=optim.adamw(lr=optim.warmup_cosine(peak=3e-3, warmup=0.1, floor=3e-4),
                          weight_decay=0.1, clip_norm=1.0),
    plan=Plan(),
    steps=20,
    log_every=5,
    eval_batches=1,
    run_dir="runs/gelu_mlp",
    tokenizer="byte",
)
