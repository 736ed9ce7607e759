"""Mixture of experts: the token-choice router, dispatch and combine by sorting, the expert
computation, and the MoE feed-forward layer, as pure functions.

A MoE layer replaces a decoder layer's MLP. Its parameters (within the layer; weights stored
``[in, out]``, one matrix per expert behind a leading "expert" axis)::

    moe.router        [hidden, E]                   ("embed", "router")   replicated
    moe.w1, moe.w3    [E, hidden, moe_ffn]          ("expert", "embed", "mlp")
    moe.w2            [E, moe_ffn, hidden]          ("expert", "mlp", "embed")
    moe.shared.w1/w3  [hidden, shared_ffn]          ("embed", "mlp")      shared experts, if any
    moe.shared.w2     [shared_ffn, hidden]          ("mlp", "embed")
    moe.shared_gate   [hidden, 1]                   ("embed", "gate")     their gate, if any

The layer (``moe_mlp``): router logits ``h @ router`` of the normed input inside the
tensor-parallel region (the router is a replicated weight applied there: ``regions.inside``, as
the experts' outputs it weights are partial sums); scores
``softmax`` or ``sigmoid`` of the logits in fp32; each token picks the ``top_k`` experts of highest
score (plus the per-expert balancing ``bias`` when given: it steers the choice only, never the
weights); the chosen scores, renormalised to sum 1 when ``norm_topk_prob``, weight the experts'
outputs. The (token, choice) pairs are sorted by expert (stable: token order within an expert) and
``regions.experts(x_sorted, counts, fn)`` runs the experts on them; ``fn`` holds the expert
weights as the layer received them (under expert parallelism: this rank's experts only) and
multiplies by all of them with one grouped GEMM (``evo_kernels.grouped``). Dropless by default;
with a ``capacity_factor`` c each expert takes at most ``ceil(c · tokens · top_k / E)`` rows, the
first ones in token order, and the rest are dropped (their output is 0; counted in the stats).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from evo.models.family import Block, ParamSpec
from evo.models.layers import LOCAL, Regions, swiglu_act
from evo_kernels.grouped import grouped_mm


class Stats(NamedTuple):
    """What one MoE layer's forward reports: ``load [E]`` fp32 the (token, choice) pairs routed
    to each expert (before any drop), ``dropped`` 0-dim fp32 the pairs dropped by the capacity,
    ``balance`` 0-dim fp32 the Switch/GShard load-balancing loss summed over this rank's tokens,
    ``E · Σ_e f_e · Σ_t p_te`` (``f_e`` the fraction of pairs routed to e, ``p_te`` token t's
    normalised score of e), differentiable through the scores: divided by the token count it is
    1 for a uniform router."""
    load: torch.Tensor
    dropped: torch.Tensor
    balance: torch.Tensor


def scores_of(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Expert scores of router ``logits [..., E]`` in fp32 (fp64 for fp64 logits): ``softmax`` or
    ``sigmoid``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")


def route(scores: torch.Tensor, top_k: int, norm_topk_prob: bool,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice top-k over ``scores [T, E]`` fp32: (expert ids ``[T, k]`` int64, their weights
    ``[T, k]`` fp32). ``bias [E]`` is added for the choice only."""
    choose = scores if bias is None else scores.detach() + bias.to(scores.dtype)
    idx = torch.topk(choose, top_k, dim=-1).indices
    weights = scores.gather(-1, idx)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    if bias is not None:    # a zero gradient: backward reaches the bias as any parameter
        weights = weights + 0.0 * bias.to(weights.dtype)[idx]
    return idx, weights


class Dispatch(NamedTuple):
    """Where each kept (token, choice) pair goes: ``rows [M]`` its flat index ``t · k + j`` in
    expert order, ``counts [E]`` int64 the kept rows per expert, ``load [E]`` the routed pairs per
    expert before dropping."""
    rows: torch.Tensor
    counts: torch.Tensor
    load: torch.Tensor


def dispatch(idx: torch.Tensor, num_experts: int, capacity: int | None = None) -> Dispatch:
    """Sort the pairs ``idx [T, k]`` by expert (stable); keep at most ``capacity`` per expert."""
    flat = idx.reshape(-1)
    load = torch.bincount(flat, minlength=num_experts)
    order = torch.argsort(flat, stable=True)
    if capacity is None:
        return Dispatch(order, load, load)
    start = torch.cumsum(load, 0) - load
    rank_in_expert = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
    keep = rank_in_expert < capacity
    return Dispatch(order[keep], load.clamp(max=capacity), load)


def capacity_of(capacity_factor: float | None, tokens: int, top_k: int, num_experts: int
                ) -> int | None:
    """Rows per expert a ``capacity_factor`` allows (None: dropless)."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def swiglu_experts(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, x: torch.Tensor,
                   counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The experts' SwiGLU MLPs on rows grouped by expert: ``x [M, D]``, ``counts [G]`` with
    ``G = w1.shape[0]`` the experts these weights hold. Bind the weights with
    ``functools.partial`` to get the ``fn`` of ``Regions.experts``."""
    g, u = grouped_mm(x, w1, counts, backend), grouped_mm(x, w3, counts, backend)
    return grouped_mm(swiglu_act(g, u), w2, counts, backend)


def balance_loss(scores: torch.Tensor, load: torch.Tensor, top_k: int, total_tokens: int,
                 score_func: str) -> torch.Tensor:
    """``E · Σ_e f_e · Σ_t p_te`` over the tokens of ``scores [T, E]`` fp32 (``f_e = load_e /
    (total_tokens · k)``, no gradient; ``p`` the scores, normalised per token for sigmoid)."""
    p = scores if score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    f = load.to(p.dtype) / max(total_tokens * top_k, 1)
    return scores.shape[-1] * (p.sum(0) * f).sum()


def moe_mlp(cfg, p: dict[str, torch.Tensor], hn: torch.Tensor, regions: Regions = LOCAL,
            bias: torch.Tensor | None = None, backend: str = "auto"
            ) -> tuple[torch.Tensor, Stats]:
    """One MoE feed-forward of the normed ``hn [batch, seq, hidden]`` (before ``regions.enter``;
    the sequence may be split):
    its output (a partial sum under tensor parallelism, like ``Llama.mlp``) and its ``Stats``.
    ``p``: the layer's parameters named within the layer (``moe.*``); ``cfg``: a MoE config
    (``num_experts``, ``top_k``, ``score_func``, ``norm_topk_prob``, ``capacity_factor``).
    ``bias [E]``: the balancing bias (``None``: none)."""
    e, k = p["moe.router"].shape[1], cfg.top_k
    h = regions.enter(hn)
    logits = h @ regions.inside(p["moe.router"])
    b, s, d = h.shape
    scores = scores_of(logits, cfg.score_func).reshape(b * s, e)
    idx, weights = route(scores, k, cfg.norm_topk_prob, bias)
    plan = dispatch(idx, e, capacity_of(cfg.capacity_factor, b * s, k, e))
    x_flat = h.reshape(b * s, d)
    fn = functools.partial(swiglu_experts, p["moe.w1"], p["moe.w3"], p["moe.w2"],
                           backend=backend)
    y_sorted = regions.experts(x_flat[plan.rows // k], plan.counts, fn)
    y = y_sorted.new_zeros(b * s * k, y_sorted.shape[-1]).index_copy(0, plan.rows, y_sorted)
    out = (y.view(b * s, k, -1) * weights.to(y.dtype)[..., None]).sum(1)
    if "moe.shared.w1" in p:
        out = out + shared_expert(p, x_flat, regions)
    # The balancing loss from the normed input before the region: each rank's own tokens, a
    # gradient complete without the region's reductions.
    local_scores = scores_of(hn @ p["moe.router"], cfg.score_func).reshape(-1, e)
    stats = Stats(plan.load.float(), (plan.load - plan.counts).sum().float(),
                  balance_loss(local_scores, plan.load, k, b * s, cfg.score_func))
    return out.view(b, s, -1), stats


def shared_expert(p: dict[str, torch.Tensor], x: torch.Tensor, regions: Regions = LOCAL
                  ) -> torch.Tensor:
    """The shared experts' SwiGLU MLP of ``x [T, D]`` (inside the region), times
    ``sigmoid(x @ shared_gate)`` when the layer has that gate (a replicated weight applied to a
    partial sum: ``regions.inside``)."""
    y = swiglu_act(x @ p["moe.shared.w1"], x @ p["moe.shared.w3"]) @ p["moe.shared.w2"]
    if "moe.shared_gate" in p:
        y = torch.sigmoid(x @ regions.inside(p["moe.shared_gate"])) * y
    return y


# ---------------------------------------------------------------------------------------------
# The record of one forward's MoE layers

class Routing:
    """What one forward's MoE layers report (``Stats`` by layer index), for the training step's
    auxiliary loss and metrics. A layer recomputed in backward (``torch.utils.checkpoint``)
    reports again; the first report stands, so nothing is counted twice."""

    def __init__(self):
        self.stats: dict[int, Stats] = {}

    def add(self, layer: int, stats: Stats) -> None:
        self.stats.setdefault(layer, stats)


# ---------------------------------------------------------------------------------------------
# The MoE fields of a config and the decoder that uses them

@dataclass(frozen=True)
class Fields:
    """The MoE fields of a LLaMA-shaped family's config (a mixin: ``Config(Fields, llama.Config)``).

    ``num_experts`` routed experts of ``moe_intermediate_size`` (None: ``intermediate_size``), of
    which each token takes ``top_k``; ``score_func`` "softmax" or "sigmoid"; ``norm_topk_prob``:
    the chosen scores renormalised to sum 1. ``shared_expert_size``: the width of the shared
    experts' MLP that every token also goes through (0: none), with a sigmoid gate when
    ``shared_expert_gate``. ``capacity_factor``: None (dropless) or > 0. ``aux_loss_coef``: the
    weight of the load-balancing loss in training. ``bias_update_rate``: auxiliary-loss-free
    balancing — each step moves every expert's selection bias by this much towards the mean load
    (0: off, no bias). Dense layers: the first ``first_k_dense``, every layer ``i`` with
    ``(i + 1) % sparse_step != 0``, and those listed in ``dense_layers`` (HF ``mlp_only_layers``);
    they have LLaMA's MLP of ``intermediate_size``.
    """
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int | None = None
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    first_k_dense: int = 0
    sparse_step: int = 1
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        for f in ("num_experts", "top_k", "sparse_step"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}.{f} must be a positive integer, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"{name}.top_k={self.top_k} must be <= num_experts="
                             f"{self.num_experts}")
        m = self.moe_intermediate_size
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m <= 0):
            raise ValueError(f"{name}.moe_intermediate_size must be a positive integer or None, "
                             f"got {m!r}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"{name}.score_func must be 'softmax' or 'sigmoid', got "
                             f"{self.score_func!r}")
        c = self.capacity_factor
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or
                              not c > 0):
            raise ValueError(f"{name}.capacity_factor must be > 0 or None (dropless), got {c!r}")
        for f in ("aux_loss_coef", "bias_update_rate"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}.{f} must be a number >= 0, got {v!r}")
        s = self.shared_expert_size
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ValueError(f"{name}.shared_expert_size must be an integer >= 0, got {s!r}")
        if self.shared_expert_gate and not s:
            raise ValueError(f"{name}.shared_expert_gate needs shared_expert_size > 0")
        if not isinstance(self.first_k_dense, int) or self.first_k_dense < 0:
            raise ValueError(f"{name}.first_k_dense must be an integer >= 0, got "
                             f"{self.first_k_dense!r}")
        if not isinstance(self.dense_layers, tuple) or any(
                not isinstance(i, int) or not 0 <= i < self.num_layers for i in self.dense_layers):
            raise ValueError(f"{name}.dense_layers must be a tuple of layer indices in "
                             f"[0, {self.num_layers}), got {self.dense_layers!r}")

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def is_moe_layer(self, i: int) -> bool:
        return (i >= self.first_k_dense and (i + 1) % self.sparse_step == 0
                and i not in self.dense_layers)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))


class Context(NamedTuple):
    """``llama.Context`` and the forward's ``Routing`` record (None: nothing recorded)."""
    cos: torch.Tensor
    sin: torch.Tensor
    attend: object
    op: object
    routing: Routing | None = None


_EXPERTS = ("moe.w1", "moe.w3", "moe.w2")      # gate, up, down; [E, in, out]


class Decoder:
    """The MoE part of a LLaMA-shaped family: a mixin placed before the dense family's class
    (``class Mixtral(moe.Decoder, llama.Llama)``), whose config mixes in ``Fields``. The layers
    ``cfg.is_moe_layer`` picks replace ``mlp.*`` by the MoE parameters (module docstring); the
    others keep the dense family's MLP.

    HF names: ``hf_moe_prefix`` is the layer's MoE module (``block_sparse_moe`` or ``mlp``),
    ``hf_expert_names`` the per-expert gate, up and down matrices (``experts.{e}.NAME.weight``).
    Export writes per-expert tensors (what ``save_pretrained`` writes); import also reads the
    packed ``experts.gate_up_proj [E, 2F, D]`` / ``experts.down_proj [E, D, F]`` (under ``mlp.``
    or the family's prefix)."""
    hf_moe_prefix: str = "mlp"
    hf_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    moe_shape_fields = ("num_experts", "moe_intermediate_size", "shared_expert_size",
                        "shared_expert_gate", "bias_update_rate", "first_k_dense", "sparse_step",
                        "dense_layers")

    # -- parameters and blocks
    def moe_specs(self, cfg) -> dict[str, ParamSpec]:
        h, e, f = cfg.hidden_size, cfg.num_experts, cfg.expert_size
        specs = {"moe.router": ParamSpec((h, e), ("embed", "router"), "normal"),
                 "moe.w1": ParamSpec((e, h, f), ("expert", "embed", "mlp"), "normal"),
                 "moe.w3": ParamSpec((e, h, f), ("expert", "embed", "mlp"), "normal"),
                 "moe.w2": ParamSpec((e, f, h), ("expert", "mlp", "embed"), "normal_out")}
        if cfg.bias_update_rate:
            specs["moe.bias"] = ParamSpec((e,), ("router",), "zeros")
        if cfg.shared_expert_size:
            s = cfg.shared_expert_size
            specs.update({"moe.shared.w1": ParamSpec((h, s), ("embed", "mlp"), "normal"),
                          "moe.shared.w3": ParamSpec((h, s), ("embed", "mlp"), "normal"),
                          "moe.shared.w2": ParamSpec((s, h), ("mlp", "embed"), "normal_out")})
        if cfg.shared_expert_gate:
            specs["moe.shared_gate"] = ParamSpec((h, 1), ("embed", "gate"), "normal")
        return specs

    def specs_of_layer(self, cfg, i: int) -> dict[str, ParamSpec]:
        """Layer ``i``'s parameters, named within the layer."""
        specs = self.layer_specs(cfg)
        if not cfg.is_moe_layer(i):
            return specs
        return {**{k: s for k, s in specs.items() if not k.startswith("mlp.")},
                **self.moe_specs(cfg)}

    def param_specs(self, cfg) -> dict[str, ParamSpec]:
        h, v = cfg.hidden_size, cfg.vocab_size
        specs = {"embed": ParamSpec((v, h), ("vocab", "embed"), "normal")}
        for i in range(cfg.num_layers):
            specs.update({f"layers.{i}.{k}": s for k, s in self.specs_of_layer(cfg, i).items()})
        specs["norm"] = ParamSpec((h,), ("norm",), "ones")
        if not cfg.tie_embeddings:
            specs["lm_head"] = ParamSpec((h, v), ("embed", "vocab"), "normal")
        return specs

    def blocks(self, cfg) -> list[Block]:
        """The dense family's blocks, each layer with its own parameters; a MoE layer passes its
        router and the shared experts' gate through ``regions.inside``."""
        out = []
        for b in super().blocks(cfg):
            i = int(b.name.split(".")[1]) if b.kind == "layer" else -1
            if i < 0 or not cfg.is_moe_layer(i):
                out.append(b)
                continue
            names = tuple(f"{b.name}.{k}" for k in self.specs_of_layer(cfg, i))
            gate = (f"{b.name}.moe.shared_gate",) if cfg.shared_expert_gate else ()
            out.append(dataclasses.replace(b, params=names,
                                           inside=(*b.inside, f"{b.name}.moe.router", *gate)))
        return out

    def tp_divisors(self, cfg) -> dict[str, int]:
        d = {**super().tp_divisors(cfg), "model.moe_intermediate_size": cfg.expert_size}
        if cfg.shared_expert_size:
            d["model.shared_expert_size"] = cfg.shared_expert_size
        if not any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
            del d["model.intermediate_size"]
        return d

    def active_params(self, cfg) -> int:
        """The parameters one token runs through: all but the input embedding, with only
        ``top_k`` of each MoE layer's experts."""
        idle = 3 * cfg.hidden_size * cfg.expert_size * (cfg.num_experts - cfg.top_k)
        return self.non_embedding_params(cfg) - idle * len(cfg.moe_layers)

    def flops_per_token(self, cfg, seq_len: int) -> float:
        """``6·N_active + 12·L·(H·D)·s``: as LLaMA's, counting the activated parameters (only
        ``top_k`` experts per MoE layer; the router and any shared experts count)."""
        dense = super().flops_per_token(cfg, seq_len)
        return dense - 6.0 * (self.non_embedding_params(cfg) - self.active_params(cfg))

    # -- computation
    def context(self, cfg, positions, dtype, attend, op) -> Context:
        return Context(*super().context(cfg, positions, dtype, attend, op))

    def with_routing(self, ctx: Context, routing: Routing) -> Context:
        return ctx._replace(routing=routing)

    def feed_forward(self, cfg, p, layer: int, x, ctx: Context, regions: Regions = LOCAL):
        if not cfg.is_moe_layer(layer):
            return super().feed_forward(cfg, p, layer, x, ctx, regions)
        hn = ctx.op.rms_norm(x, p["mlp_norm"], cfg.norm_eps)
        out, stats = moe_mlp(cfg, p, hn, regions, p.get("moe.bias"))
        if ctx.routing is not None:
            ctx.routing.add(layer, stats)
        return regions.exit(out)

    # -- checkpoints (JSON: dense_layers a list)
    def config_to_dict(self, cfg) -> dict:
        return {**super().config_to_dict(cfg), "dense_layers": list(cfg.dense_layers)}

    def config_from_dict(self, d: dict):
        d = dict(d)
        d["dense_layers"] = tuple(d.get("dense_layers", ()))
        return super().config_from_dict(d)

    # -- HF
    def hf_moe_config(self, d: dict, *, source: str) -> dict:
        """The ``Fields`` a config.json's MoE keys give (subclasses read their spellings)."""
        raise NotImplementedError

    def config_to_hf(self, cfg, *, dtype_name: str) -> dict:
        if cfg.bias_update_rate:
            raise ValueError(f"bias_update_rate={cfg.bias_update_rate}: the {self.name!r} "
                             "family's HF format has no tensor for the balancing bias")
        return super().config_to_hf(cfg, dtype_name=dtype_name)

    def _expert_names(self, i, which: int, e: int) -> str:
        return f"model.layers.{i}.{self.hf_moe_prefix}.experts.{e}.{self.hf_expert_names[which]}" \
               ".weight"

    def hf_tensors(self, cfg, name, w):
        rest = name.split(".", 2)[2] if name.startswith("layers.") else ""
        if rest in _EXPERTS:
            i, which = name.split(".")[1], _EXPERTS.index(rest)
            return {self._expert_names(i, which, e): w[e].t() for e in range(w.shape[0])}
        return super().hf_tensors(cfg, name, w)

    def hf_join(self, cfg, name, parts):
        rest = name.split(".", 2)[2] if name.startswith("layers.") else ""
        if rest in _EXPERTS:
            return torch.stack([t.t() for t in parts.values()])
        return super().hf_join(cfg, name, parts)

    def _packed_prefix(self, i: int, present) -> str | None:
        for pfx in (self.hf_moe_prefix, "mlp"):
            if f"model.layers.{i}.{pfx}.experts.gate_up_proj" in present:
                return pfx
        return None

    def hf_read_names(self, cfg, present) -> dict[str, torch.Tensor]:
        """The tensors to read (meta tensors of their shapes): per layer, the packed expert
        tensors where the files hold them, the per-expert ones otherwise."""
        names = super().hf_read_names(cfg, present)
        h, e, f = cfg.hidden_size, cfg.num_experts, cfg.expert_size
        for i in cfg.moe_layers:
            pfx = self._packed_prefix(i, present)
            if pfx is None:
                continue
            for which in range(3):
                for x in range(e):
                    del names[self._expert_names(i, which, x)]
            base = f"model.layers.{i}.{pfx}"
            names[f"{base}.experts.gate_up_proj"] = torch.empty(e, 2 * f, h, device="meta")
            names[f"{base}.experts.down_proj"] = torch.empty(e, h, f, device="meta")
            if pfx != self.hf_moe_prefix:    # the router moved with the experts
                del names[f"model.layers.{i}.{self.hf_moe_prefix}.gate.weight"]
                names[f"{base}.gate.weight"] = torch.empty(e, h, device="meta")
        return names

    def from_hf(self, cfg, state, *, source: str):
        """Also reads the packed expert tensors (``hf_read_names``)."""
        state = dict(state)
        for i in cfg.moe_layers:
            pfx = self._packed_prefix(i, state)
            if pfx is None:
                continue
            base = f"model.layers.{i}.{pfx}"
            gate_up = state.pop(f"{base}.experts.gate_up_proj")
            down = state.pop(f"{base}.experts.down_proj", None)
            if down is None:
                raise ValueError(f"{source}: tensor {base + '.experts.down_proj'!r} is missing")
            f = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                for which, t in enumerate((gate_up[e, :f], gate_up[e, f:], down[e])):
                    state[self._expert_names(i, which, e)] = t
            if pfx != self.hf_moe_prefix and f"{base}.gate.weight" in state:
                state[f"model.layers.{i}.{self.hf_moe_prefix}.gate.weight"] = \
                    state.pop(f"{base}.gate.weight")
        return super().from_hf(cfg, state, source=source)


def require_hf(cfg, family: str, **values) -> None:
    """Raise ValueError naming the field when ``cfg`` differs from what ``family``'s HF format can
    express (``values``: field -> the one value it can)."""
    for field, v in values.items():
        if getattr(cfg, field) != v:
            raise ValueError(f"{type(cfg).__name__}.{field}={getattr(cfg, field)!r}: the "
                             f"{family!r} family's HF format needs {v!r}")


# ---------------------------------------------------------------------------------------------
# Training: the step's sums over micro-batches, the auxiliary loss, the balancing bias

def routed(cfg) -> bool:
    """Whether ``cfg``'s family has MoE layers (its forward records a ``Routing``)."""
    return isinstance(cfg, Fields)


class Totals:
    """One step's MoE sums over its micro-batches on this rank: ``load [moe layers, E]`` the
    (token, choice) pairs routed to each expert, ``dropped`` the pairs dropped by the capacity,
    ``balance`` the load-balancing loss (``Stats.balance``) summed over layers and tokens times
    the step's loss normaliser. Layers another pipeline stage runs are absent: their rows stay 0."""

    def __init__(self, cfg, device=None):
        self.layers, self.coef = cfg.moe_layers, float(cfg.aux_loss_coef)
        self.load = torch.zeros(len(self.layers), cfg.num_experts, device=device)
        self.dropped = torch.zeros((), device=device)
        self.balance = torch.zeros((), device=device)

    def add(self, routing: Routing, scale: torch.Tensor) -> torch.Tensor:
        """Add one micro-batch's record; returns its auxiliary loss before ``scale`` (``coef · Σ
        balance``, differentiable; 0 without a coefficient), which the step adds to the summed
        token losses: the objective is ``(Σ CE + coef · Σ balance) / labelled tokens``, so
        micro-batches and data-parallel ranks add up to the one-process value."""
        total = torch.zeros((), device=self.load.device)
        for j, i in enumerate(self.layers):
            s = routing.stats.get(i)
            if s is None:
                continue
            self.load[j] += s.load.detach()
            self.dropped += s.dropped.detach()
            total = total + s.balance
        self.balance += total.detach().float() * scale
        return self.coef * total if self.coef else total.new_zeros(())

    def metrics(self) -> dict[str, torch.Tensor]:
        """``expert_load [moe layers, E]``, ``dropped_tokens`` and ``aux_loss``: the balancing
        loss per MoE layer (1 for a uniform router), all sums a data-parallel step all-reduces
        (``aux_loss`` is normalised by the global labelled-token count already)."""
        return {"expert_load": self.load, "dropped_tokens": self.dropped,
                "aux_loss": self.balance / max(len(self.layers), 1)}


def bias_steps(cfg, load: torch.Tensor) -> dict[str, torch.Tensor]:
    """Auxiliary-loss-free balancing (DeepSeek-V3): what each MoE layer's ``moe.bias [E]`` moves
    by after a step whose ``load [moe layers, E]`` (summed over all data-parallel ranks) is given:
    ``bias_update_rate`` up for experts below the layer's mean load, down above it (0 at the
    mean, and everywhere for a zero load). Empty without ``bias_update_rate``."""
    if not cfg.bias_update_rate:
        return {}
    return {f"layers.{i}.moe.bias": torch.sign(load[j].mean() - load[j]) * cfg.bias_update_rate
            for j, i in enumerate(cfg.moe_layers)}


def update_bias(cfg, params: dict[str, torch.Tensor], load: torch.Tensor
                ) -> dict[str, torch.Tensor]:
    """``params`` with ``bias_steps`` added (a new dict; the other tensors shared)."""
    steps = bias_steps(cfg, load)
    return {k: v + steps[k].to(v.dtype) if k in steps else v for k, v in params.items()}
