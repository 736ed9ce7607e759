"""The training step as a pure function: ``state, metrics = step(state, batch)``.

A batch holds one optimizer step's data, every tensor with a leading ``micro_num`` dimension:

- ``tokens`` int64 ``[micro_num, T]`` (one packed row per micro-batch, documents delimited by
  ``cu_seqlens``) or ``[micro_num, batch, seq]`` (every row its own sequence);
- ``labels`` int64, same shape; ``-100`` contributes no loss;
- optional ``positions`` int64, same shape; optional ``cu_seqlens`` int ``[micro_num, K]``
  (boundaries over each micro-batch's tokens, right-padded by repeating the last value);
- optional ``source`` int64, same shape as ``tokens``: the data source of each token (-1: none),
  for the per-source loss of a step built with ``sources > 0``.

The loss is the mean over every labelled token of the whole batch, so ``micro_num`` micro-batches
give the same loss and update as one batch ``micro_num`` times larger.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from evo import models, optim, scaler, tree
from evo.models.layers import LOCAL, Regions, cross_entropy_sum, ops

IGNORE = -100


class GradSink(Protocol):
    """Takes each parameter's complete gradient as backward produces it (see ``Step.grads``)."""
    def __call__(self, name: str, grad: torch.Tensor) -> None: ...
    def finish(self) -> dict[str, torch.Tensor]: ...


class TrainState(NamedTuple):
    """Everything a step reads and writes: a pytree for optree, torch.func and checkpoints."""
    step: torch.Tensor                 # 0-dim int64: optimizer steps taken
    params: dict[str, torch.Tensor]    # fp32 master weights
    opt_state: optim.AdamState
    # float16 loss scaling; () when not (yet) used: an empty node in torch's pytrees and optree's
    # alike, where None would be a leaf to one and nothing to the other
    scaler: scaler.ScalerState | tuple = ()


def init_state(params: dict[str, torch.Tensor], optimizer: optim.AdamW) -> TrainState:
    return TrainState(torch.zeros((), dtype=torch.int64), params, optimizer.init(params))


def micro_batches(batch: dict[str, torch.Tensor]):
    """Yield ``(tokens [b, s], labels, positions | None, cu_seqlens | None)`` per micro-batch."""
    tokens = batch["tokens"]
    for i in range(tokens.shape[0]):
        t, lab = tokens[i], batch["labels"][i]
        pos = batch["positions"][i] if "positions" in batch else None
        cu = batch["cu_seqlens"][i] if "cu_seqlens" in batch else None
        if t.dim() == 1:
            t, lab = t[None], lab[None]
            pos = pos[None] if pos is not None else None
        yield t, lab, pos, cu


def valid_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"] != IGNORE).sum()


@dataclass(frozen=True)
class Step:
    """One optimizer step of ``model`` with ``optimizer``; call it as ``step(state, batch)``.

    ``compute_dtype``: the dtype of the forward and backward (the master weights, fp32 in training,
    are cast to it once per step; gradients are accumulated in the master weights' dtype). ``remat``: fraction of layers recomputed in
    backward. ``donate``: the state passed in may be updated in place and must not be used again
    (like ``jax.jit(donate_argnums=0)``); the default leaves it untouched. ``sources``: the number
    of data sources the batch's ``source`` ids index; when positive, metrics gain
    ``source_loss_sum`` and ``source_tokens`` (fp32 ``[sources]``: summed loss and labelled tokens
    of each source). ``compile``: run each micro-batch's forward and backward through
    ``torch.compile`` (one graph per input shape; the optimizer update stays eager, foreach).
    ``kernels``: "torch" or "triton" elementwise ops in the model (``layers.ops``).
    ``model``: the config of any registered model family (``evo.models``). ``schedule``: how the
    micro-batches run (``Sequential``: one after another; a pipeline schedule replaces it).
    ``loss_scale``: the dynamic loss scaling of a float16 step (default ``scaler.LossScale()``;
    ignored for other dtypes); metrics then gain ``loss_scale``, the scale this step used.
    """
    model: object
    optimizer: optim.AdamW
    compute_dtype: torch.dtype = torch.float32
    remat: float = 0.0
    attention: str = "auto"
    donate: bool = False
    sources: int = 0
    compile: bool = False
    kernels: str = "torch"
    schedule: "Schedule" = dataclasses.field(default_factory=lambda: Sequential())
    loss_scale: scaler.LossScale | None = None

    def __post_init__(self):
        try:
            models.family_of(self.model)
        except ValueError as e:
            raise ValueError(f"Step.model: {e}") from None
        if not 0.0 <= self.remat <= 1.0:
            raise ValueError(f"Step.remat must be a fraction in [0, 1], got {self.remat!r}")
        ops(self.kernels)  # an unknown name fails here, not in the first step
        if self.compute_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"Step.compute_dtype must be float32, bfloat16, float16 or float64, got "
                             f"{self.compute_dtype}")
        if self.scaling is not None and not self.optimizer.skip_nonfinite:
            raise ValueError("Step: float16 loss scaling skips the steps that overflow, so "
                             "optimizer.skip_nonfinite must be True")

    @property
    def scaling(self) -> scaler.LossScale | None:
        """The loss scaling this step applies: float16 compute only."""
        if self.compute_dtype != torch.float16:
            return None
        return self.loss_scale or scaler.LossScale()

    def scaler_state(self, state: TrainState) -> scaler.ScalerState | None:
        """The loss scaler's state this step starts from (its initial state at first)."""
        if self.scaling is None:
            return None
        return state.scaler if state.scaler else self.scaling.init(state.step.device)

    def next_scaler(self, current: scaler.ScalerState | None, info: dict
                    ) -> scaler.ScalerState | tuple:
        return () if current is None else self.scaling.update(current, info["skipped"])

    def token_losses(self, params: dict[str, torch.Tensor], tokens, labels, positions=None,
                     cu_seqlens=None, regions: Regions = LOCAL, routing=None) -> torch.Tensor:
        """Loss of every token of one micro-batch, fp32 ``[N]``, 0 where unlabelled.
        ``routing``: a ``models.moe.Routing`` a MoE model's layers report into."""
        if self.compile and not torch.compiler.is_compiling():
            if models.is_concrete(tokens):
                models.check_inputs(self.model, tokens, positions, cu_seqlens)
            return self._compiled(params, tokens, labels, positions, cu_seqlens, regions, routing)
        return self._token_losses(params, tokens, labels, positions, cu_seqlens, regions, routing)

    @functools.cached_property
    def _compiled(self):
        return torch.compile(self._token_losses, dynamic=False)

    def _token_losses(self, params, tokens, labels, positions, cu_seqlens, regions,
                      routing=None):
        logits = models.forward(self.model, params, tokens, positions, cu_seqlens,
                                remat=self.remat, attention=self.attention, regions=regions,
                                kernels=self.kernels, routing=routing)
        return regions.cross_entropy(logits, labels)

    def loss_sum(self, params: dict[str, torch.Tensor], tokens, labels, positions=None,
                 cu_seqlens=None, regions: Regions = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and labelled-token count of one micro-batch: a pure function of params."""
        losses = self.token_losses(params, tokens, labels, positions, cu_seqlens, regions)
        return losses.sum(), (labels != IGNORE).sum()

    def grads(self, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
              normalizer: torch.Tensor | None = None, regions: Regions = LOCAL,
              on_ready: "GradSink | None" = None, loss_scale: torch.Tensor | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Gradients of the batch's mean loss in the master weights' dtype, and ``{"loss": the
        mean loss (0-dim)}`` (with ``source_loss_sum`` and ``source_tokens`` when ``sources``).

        ``normalizer``: the number of labelled tokens the mean divides by (default: this batch's);
        a data-parallel step passes the global count so that summing gradients over ranks gives the
        gradient of the global mean. ``regions``: the parallel layout's hooks (see
        ``evo.models.layers.Regions``). ``on_ready``: receives each parameter's complete gradient
        the moment the last micro-batch's backward produces it (so its reduction can overlap the
        rest of backward); the gradients returned are then what ``on_ready.finish()`` returns.
        ``loss_scale``: backward runs on the loss times this factor (gradients come out scaled by
        it; the returned loss is not).
        """
        n = valid_tokens(batch) if normalizer is None else normalizer
        scale = 1.0 / n.clamp(min=1).to(torch.float32)
        leaves = {k: v.detach().to(self.compute_dtype).requires_grad_(True)
                  for k, v in params.items()}
        acc = Accumulator(params, batch, self.sources, self.compute_dtype, loss_scale,
                          model=self.model)
        self.schedule(self, leaves, batch, scale, regions, acc, on_ready)
        return acc.finish(on_ready)

    def micro_step(self, leaves: dict[str, torch.Tensor], index: int, micro: tuple,
                   scale: torch.Tensor, regions: Regions, acc: "Accumulator",
                   on_ready: "GradSink | None" = None) -> None:
        """Forward and backward of micro-batch ``index`` (``micro``: what ``micro_batches``
        yields), its gradients (of the loss times ``scale``) added to ``acc``. With ``on_ready``,
        this is the last micro-batch: each complete gradient goes to ``on_ready`` the moment
        backward produces it."""
        tokens, labels, positions, cu = micro
        hooks = [x.register_hook(lambda g, k=k: on_ready(k, acc.complete(k, g)))
                 for k, x in leaves.items()] if on_ready is not None else []
        routing = models.moe.Routing() if acc.moe is not None else None
        losses = self.token_losses(leaves, tokens, labels, positions, cu, regions, routing)
        acc.add_losses(index, labels, losses, scale)
        total = losses.sum() if routing is None else losses.sum() + acc.moe.add(routing, scale)
        g = torch.autograd.grad(acc.backward_loss(total * scale), list(leaves.values()),
                                allow_unused=True)
        for h in hooks:
            h.remove()
        if on_ready is None:
            acc.add_grads({k: torch.zeros_like(x) if gk is None else gk
                           for (k, x), gk in zip(leaves.items(), g)})

    def apply_grads(self, state: TrainState, grads: dict[str, torch.Tensor]
                    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        params, opt_state, info = self.optimizer.update(grads, state.opt_state, state.params,
                                                        state.step, inplace=self.donate)
        return TrainState(state.step + 1, params, opt_state), info

    def __call__(self, state: TrainState, batch: dict[str, torch.Tensor]
                 ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        scaled = self.scaler_state(state)
        grads, aux = self.grads(state.params, batch,
                                loss_scale=None if scaled is None else scaled.scale)
        if scaled is not None:
            scaler.unscale_(grads, scaled)
        new_state, info = self.apply_grads(state, grads)
        if "expert_load" in aux:     # a skipped step's zero load moves no balancing bias
            new_state = new_state._replace(params=models.moe.update_bias(
                self.model, new_state.params, aux["expert_load"] * ~info["skipped"]))
        metrics = {**aux, "grad_norm": info["grad_norm"], "lr": info["lr"],
                   "skipped": info["skipped"], "tokens": torch.tensor(batch["tokens"].numel()),
                   "valid_tokens": valid_tokens(batch)}
        if scaled is not None:
            metrics["loss_scale"] = scaled.scale
        return new_state._replace(scaler=self.next_scaler(scaled, info)), metrics


class Accumulator:
    """What the micro-batches of one step add up: gradients in the master weights' dtype, the
    loss, (with ``sources``) per-source losses and labelled tokens, and (for a MoE ``model``) the
    expert loads and balancing loss (``moe``: a ``models.moe.Totals``, else None)."""

    def __init__(self, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                 sources: int, compute_dtype: torch.dtype,
                 loss_scale: torch.Tensor | None = None, model=None):
        self.dtypes = {k: v.dtype for k, v in params.items()}
        self.grads: dict[str, torch.Tensor] = {}
        self.loss_scale = loss_scale
        self.loss = torch.zeros((), dtype=torch.promote_types(torch.float32, compute_dtype))
        self.batch, self.sources = batch, sources if "source" in batch else 0
        dev = batch["tokens"].device
        self.src_loss = torch.zeros(self.sources, device=dev)
        self.src_tokens = torch.zeros(self.sources, device=dev)
        self.moe = models.moe.Totals(model, dev) if models.moe.routed(model) else None

    def add_losses(self, index: int, labels, losses: torch.Tensor, scale) -> None:
        self.loss = self.loss + (losses.detach().sum() * scale)
        if self.sources:
            src = self.batch["source"][index].reshape(-1)
            keep = ((src >= 0) & (labels.reshape(-1) != IGNORE)).float()
            self.src_loss.index_add_(0, src.clamp(min=0), losses.detach().float() * keep)
            self.src_tokens.index_add_(0, src.clamp(min=0), keep)

    def backward_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What backward differentiates: the loss times the float16 loss scale, if any."""
        return loss if self.loss_scale is None else loss * self.loss_scale

    def complete(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The last micro-batch's gradient of ``name`` plus the earlier ones'."""
        grad = grad.to(self.dtypes[name])
        return self.grads[name] + grad if name in self.grads else grad

    def add_grads(self, grads: dict[str, torch.Tensor]) -> None:
        for k, g in grads.items():
            g = g.to(self.dtypes[k])
            self.grads[k] = self.grads[k].add_(g) if k in self.grads else g

    def finish(self, on_ready: "GradSink | None") -> tuple[dict, dict]:
        grads = on_ready.finish() if on_ready is not None else self.grads
        assert grads, "a batch needs at least one micro-batch"
        aux = {"loss": self.loss}
        if self.sources:
            aux.update(source_loss_sum=self.src_loss, source_tokens=self.src_tokens)
        if self.moe is not None:
            aux.update(self.moe.metrics())
        return grads, aux


class Schedule(Protocol):
    """Runs one step's micro-batches: calls ``step.micro_step`` for each (the last one with
    ``on_ready``), in whatever order and placement the schedule chooses."""
    def __call__(self, step: Step, leaves: dict[str, torch.Tensor],
                 batch: dict[str, torch.Tensor], scale: torch.Tensor, regions: Regions,
                 acc: Accumulator, on_ready: "GradSink | None") -> None: ...


class Sequential:
    """The micro-batches one after another on this rank, gradients accumulated."""

    def __call__(self, step, leaves, batch, scale, regions, acc, on_ready) -> None:
        n = batch["tokens"].shape[0]
        for i, micro in enumerate(micro_batches(batch)):
            step.micro_step(leaves, i, micro, scale, regions, acc,
                            on_ready if i == n - 1 else None)

    def __eq__(self, other) -> bool:
        return type(other) is Sequential

    def __hash__(self) -> int:
        return hash(Sequential)

    def __repr__(self) -> str:
        return "Sequential()"


@torch.no_grad()
def evaluate(model, params: dict[str, torch.Tensor],
             batch: dict[str, torch.Tensor], *, compute_dtype: torch.dtype = torch.float32,
             attention: str = "auto") -> dict[str, torch.Tensor]:
    """Summed loss, labelled-token count and correct next-token predictions over a batch."""
    cp = tree.cast(params, compute_dtype)
    loss = torch.zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.int64)
    correct = torch.zeros((), dtype=torch.int64)
    for tokens, labels, positions, cu in micro_batches(batch):
        logits = models.forward(model, cp, tokens, positions, cu, attention=attention)
        ls, n = cross_entropy_sum(logits, labels)
        mask = labels != IGNORE
        loss, count = loss + ls, count + n
        correct = correct + ((logits.argmax(-1) == labels) & mask).sum()
    return {"loss_sum": loss, "count": count, "correct": correct}
