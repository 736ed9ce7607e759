"""Check a plan for a large world in one process, without hardware.

``simulate`` joins torch's fake process group at the requested world size (collectives return
without moving data), builds the real mesh with its real process groups, and creates one rank's
sharded TrainState on the ``meta`` device: the same code paths as a real run, nothing allocated.
It reports that rank's local shapes and bytes, and checks them against the arithmetic of
``planner.per_rank_bytes``.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from evo import optim, tree
from evo.sharding import pipeline, planner
from evo.sharding.layout import model_layouts
from evo.sharding.mesh import build_mesh
from evo.sharding.plan import Plan


def simulate(cfg, plan: Plan, world: int, *, rank: int = 0) -> dict:
    """Rank ``rank``'s view of ``plan`` over ``world`` processes: the resolved plan, its mesh
    coordinates, every parameter's global / tensor-parallel / stored shape, and the bytes of its
    params, grads and AdamW state. Raises ValueError naming the field for a plan that does not fit
    the world or the model, before anything is created."""
    resolved = plan.resolve(world)
    model_layouts(resolved, cfg)  # the plan fits the model
    pipeline.check(cfg, resolved)
    if dist.is_initialized():
        raise RuntimeError("simulate needs a process without a process group; this one has a "
                           f"world of {dist.get_world_size()}")
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  registers backend "fake"
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = build_mesh(plan)
        params = planner.init_params(cfg, 0, mesh, device="meta")
        state = planner.init_state(cfg, optim.adamw(lr=0.0), params, mesh)
        layouts = planner.local_layouts(cfg, mesh)
        grad_shapes = {k: (l.shard_shape if mesh.plan.zero >= 2 else l.local_shape)
                       for k, l in layouts.items()}
        measured = {
            "params": tree.num_bytes(state.params),
            "grads": sum(math.prod(s) * 4 for s in grad_shapes.values()),
            "optimizer": tree.num_bytes((state.opt_state.mu, state.opt_state.nu)),
        }
        measured["total"] = sum(measured.values())
        expected = planner.per_rank_bytes(cfg, mesh.plan, pp_index=mesh.coords["pp"])
        if measured != expected:
            raise AssertionError(f"simulated bytes {measured} differ from the arithmetic "
                                 f"{expected}")
        return {"plan": mesh.plan, "rank": mesh.rank, "coords": mesh.coords,
                "shapes": {k: {"global": l.shape, "tp_piece": l.local_shape,
                               "stored": tuple(state.params[k].shape)}
                           for k, l in layouts.items()},
                "bytes": measured}
    finally:
        dist.destroy_process_group()


def plan_report(cfg, plans: list[Plan], world: int, *, micro_num: int = 1,
                tokens_per_micro: int = 4096) -> str:
    """A table: per-rank GB of params / grads / AdamW state and communication per step, for each
    plan at ``world`` processes (arithmetic only; ``simulate`` checks a plan for real)."""
    rows = [f"{'plan':<44}{'params':>8}{'grads':>8}{'adam':>8}{'total':>8}  comm GB/step"]
    for plan in plans:
        try:
            p = plan.resolve(world)
            b = planner.per_rank_bytes(cfg, p)
            comm = planner.expected_comm_bytes(cfg, p, micro_num=micro_num,
                                               tokens_per_micro=tokens_per_micro,
                                               compute_dtype=torch.bfloat16)
        except ValueError as e:
            rows.append(f"{_short(plan):<44}  invalid: {e}")
            continue
        gb = lambda x: f"{x / 2**30:8.2f}"  # noqa: E731
        per_axis = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in sorted(comm.items()))
        rows.append(f"{_short(p):<44}{gb(b['params'])}{gb(b['grads'])}{gb(b['optimizer'])}"
                    f"{gb(b['total'])}  {per_axis or '-'}")
    return "\n".join(rows)


def _short(p: Plan) -> str:
    s = f"dp={p.dp},tp={p.tp},zero={p.zero},zero_group={p.zero_group}"
    s += f",pp={p.pp}" if p.pp > 1 else ""
    s += "".join(f",{f}={getattr(p, f)}" for f in ("sp", "cp") if getattr(p, f) > 1)
    return s + (",sp" if p.sequence_parallel else "") + (f",ep={p.ep}" if p.ep > 1 else "")


def long_context_report(cfg, plans: list[Plan], world: int,
                        seqs: tuple[int, ...] = (8192, 16384, 32768, 65536)) -> str:
    """A table for the plans with a sequence group (``sp`` / ``cp`` > 1) and the one-process
    baseline: per-rank activation MiB of one micro-batch row at each sequence length
    (``context.activation_bytes``, fp32) and the MiB each rank sends per layer at the longest
    (``context.bytes_per_layer``, bf16: Ulysses all-to-all over sp, ring send/receive over cp)."""
    from evo.sharding import context
    head = "".join(f"{'act@' + str(s // 1024) + 'k':>10}" for s in seqs)
    rows = [f"{'long context (per rank, MiB)':<44}{head}  sent per layer @{seqs[-1] // 1024}k"]
    for plan in [Plan(dp=1)] + [p for p in plans if p.sp * p.cp > 1]:
        try:
            p = plan.resolve(world if plan.sp * plan.cp > 1 else 1)
            acts = [context.activation_bytes(cfg, p, s)["total"] for s in seqs]
            sent = context.bytes_per_layer(cfg, p, seqs[-1])
        except ValueError as e:
            rows.append(f"{_short(plan):<44}  invalid: {e}")
            continue
        rows.append(f"{_short(p):<44}" + "".join(f"{a / 2**20:10.0f}" for a in acts) + "  " +
                    (", ".join(f"{k} {v / 2**20:.1f}" for k, v in sorted(sent.items())) or "-"))
    return "\n".join(rows)
