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

import functools
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from evo import optim, scaler, tree
from evo.models import llama
from evo.models.layers import LOCAL, Regions, cross_entropy_sum
from evo.models.llama import is_concrete  # noqa: E402

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
    ``kernels``: "torch" or "triton" elementwise ops in the model (``llama.ops``).
    ``loss_scale``: the dynamic loss scaling of a float16 step (default ``scaler.LossScale()``;
    ignored for other dtypes); metrics then gain ``loss_scale``, the scale this step used.
    """
    model: llama.Config
    optimizer: optim.AdamW
    compute_dtype: torch.dtype = torch.float32
    remat: float = 0.0
    attention: str = "auto"
    donate: bool = False
    sources: int = 0
    compile: bool = False
    kernels: str = "torch"
    loss_scale: scaler.LossScale | None = None

    def __post_init__(self):
        if not 0.0 <= self.remat <= 1.0:
            raise ValueError(f"Step.remat must be a fraction in [0, 1], got {self.remat!r}")
        llama.ops(self.kernels)  # an unknown name fails here, not in the first step
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
                     cu_seqlens=None, regions: Regions = LOCAL) -> torch.Tensor:
        """Loss of every token of one micro-batch, fp32 ``[N]``, 0 where unlabelled."""
        if self.compile and not torch.compiler.is_compiling():
            if is_concrete(tokens):
                llama.check_inputs(self.model, tokens, positions, cu_seqlens)
            return self._compiled(params, tokens, labels, positions, cu_seqlens, regions)
        return self._token_losses(params, tokens, labels, positions, cu_seqlens, regions)

    @functools.cached_property
    def _compiled(self):
        return torch.compile(self._token_losses, dynamic=False)

    def _token_losses(self, params, tokens, labels, positions, cu_seqlens, regions):
        logits = llama.apply(self.model, params, tokens, positions, cu_seqlens, remat=self.remat,
                             attention=self.attention, regions=regions, kernels=self.kernels)
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
        names, inputs = list(leaves), list(leaves.values())
        acc: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.promote_types(torch.float32, self.compute_dtype))
        per_source = self.sources > 0 and "source" in batch
        if per_source:
            src_loss = torch.zeros(self.sources, device=batch["tokens"].device)
            src_tokens = torch.zeros(self.sources, device=batch["tokens"].device)
        n_micro = batch["tokens"].shape[0]
        for i, (tokens, labels, positions, cu) in enumerate(micro_batches(batch)):
            hooks = []
            if on_ready is not None and i == n_micro - 1:
                def ready(g, k):
                    g = g.to(params[k].dtype)
                    on_ready(k, acc[k] + g if k in acc else g)
                hooks = [x.register_hook(lambda g, k=k: ready(g, k)) for k, x in leaves.items()]
            losses = self.token_losses(leaves, tokens, labels, positions, cu, regions)
            if per_source:
                src = batch["source"][i].reshape(-1)
                keep = ((src >= 0) & (labels.reshape(-1) != IGNORE)).float()
                src_loss.index_add_(0, src.clamp(min=0), losses.detach().float() * keep)
                src_tokens.index_add_(0, src.clamp(min=0), keep)
            loss = losses.sum() * scale
            g = torch.autograd.grad(loss if loss_scale is None else loss * loss_scale, inputs,
                                    allow_unused=True)
            total = total + loss.detach()
            if hooks:
                for h in hooks:
                    h.remove()
                acc = on_ready.finish()
                break
            for k, gi, x in zip(names, g, inputs):
                gi = torch.zeros_like(x) if gi is None else gi
                gi = gi.to(params[k].dtype)
                acc[k] = acc[k].add_(gi) if k in acc else gi
        assert acc, "a batch needs at least one micro-batch"
        aux = {"loss": total}
        if per_source:
            aux.update(source_loss_sum=src_loss, source_tokens=src_tokens)
        return acc, aux

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
        metrics = {**aux, "grad_norm": info["grad_norm"], "lr": info["lr"],
                   "skipped": info["skipped"], "tokens": torch.tensor(batch["tokens"].numel()),
                   "valid_tokens": valid_tokens(batch)}
        if scaled is not None:
            metrics["loss_scale"] = scaled.scale
        return new_state._replace(scaler=self.next_scaler(scaled, info)), metrics


@torch.no_grad()
def evaluate(model: llama.Config, params: dict[str, torch.Tensor],
             batch: dict[str, torch.Tensor], *, compute_dtype: torch.dtype = torch.float32,
             attention: str = "auto") -> dict[str, torch.Tensor]:
    """Summed loss, labelled-token count and correct next-token predictions over a batch."""
    cp = tree.cast(params, compute_dtype)
    loss = torch.zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.int64)
    correct = torch.zeros((), dtype=torch.int64)
    for tokens, labels, positions, cu in micro_batches(batch):
        logits = llama.apply(model, cp, tokens, positions, cu, attention=attention)
        ls, n = cross_entropy_sum(logits, labels)
        mask = labels != IGNORE
        loss, count = loss + ls, count + n
        correct = correct + ((logits.argmax(-1) == labels) & mask).sum()
    return {"loss_sum": loss, "count": count, "correct": correct}
