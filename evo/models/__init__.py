"""Model families behind one contract (``family.Family``), a registry by name, and the generic
entry points that run any registered family's config::

    params = models.init(cfg, seed=0)            # dict[str, Tensor]
    logits = models.forward(cfg, params, tokens)  # [batch, seq, vocab]
    models.family_of(cfg).name                    # "llama", "internlm2", ...

Each family module holds its frozen ``Config``; ``models.llama`` also keeps the names the docs use
(``llama.Config``, ``llama.init``, ``llama.axes``, ``llama.apply``).
"""
from evo.models import internlm2, llama, mistral, mixtral, moe, qwen2, qwen3, qwen_moe
from evo.models.family import (UNRECORDED_FAMILY, Block, Family, KVCache, ParamSpec, axes,
                               blocks, check_inputs, decode, family_of, flops_per_token,
                               for_architecture, forward, get, hf_architectures, init, init_cache,
                               init_param, is_concrete, names, num_params, param_specs, register)

apply = forward

# The dense decoder whose layer `evo calibrate` times to measure a machine's compute efficiency.
REFERENCE_FAMILY = llama.Llama.name

__all__ = ["REFERENCE_FAMILY", "UNRECORDED_FAMILY", "Block", "Family", "KVCache", "ParamSpec", "apply", "axes",
           "blocks", "check_inputs", "decode", "family_of", "flops_per_token", "for_architecture",
           "forward", "get", "hf_architectures", "init", "init_cache", "init_param", "internlm2",
           "is_concrete", "llama", "mistral", "mixtral", "moe", "names", "num_params",
           "param_specs", "qwen2", "qwen3", "qwen_moe", "register"]
