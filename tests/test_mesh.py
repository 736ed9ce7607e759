"""The mesh and the layout rules: pure arithmetic, checked against independent references.

Coordinates are checked against ``numpy.unravel_index`` / ``ravel_multi_index`` (C order: the last
axis varies fastest), groups against a reshaped ``numpy.arange`` of the world, today's rank layout
against the formulas the mesh had before it knew named axes, and 2-D pieces against
``torch.chunk`` of the global array. Everything is integer arithmetic: equality is exact.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from evo import optim, train
from evo.models import llama
from evo.sharding import Plan, shard
from evo.sharding.layout import param_layout
from evo.sharding.mesh import AXIS_ORDER, MeshShape, build_mesh, coords, members, mesh_shape

SHAPES = [  # up to 4 base axes, worlds up to 1024, derived axes contiguous or not
    MeshShape((("tp", 8),)),
    MeshShape((("replica", 4), ("zero", 2), ("tp", 2)), (("dp", ("replica", "zero")),)),
    MeshShape((("pp", 4), ("replica", 2), ("zero", 16), ("tp", 8)),
              (("dp", ("replica", "zero")), ("stage_tp", ("pp", "tp")))),
    MeshShape((("pp", 2), ("zero", 4), ("cp", 4), ("tp", 2)),
              (("dp", ("zero",)), ("zero_cp", ("zero", "cp")))),
    MeshShape((("replica", 2), ("ep", 4), ("sp", 4), ("tp", 2)),
              (("dp", ("replica", "ep")), ("ep_sp", ("ep", "sp")))),
]


def _ids(shape):
    return "x".join(f"{n}{s}" for n, s in shape.base)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_rank_coordinates_round_trip(shape):
    names, dims = [n for n, _ in shape.base], [s for _, s in shape.base]
    assert shape.world_size == math.prod(dims)
    for rank in range(shape.world_size):
        c = shape.coords(rank)
        assert [c[n] for n in names] == [int(i) for i in np.unravel_index(rank, dims)]
        for axis, parts in shape.derived:
            ref = np.ravel_multi_index([c[p] for p in parts], [dict(shape.base)[p] for p in parts])
            assert c[axis] == ref
        assert shape.rank(c) == rank


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_groups_of_every_axis(shape):
    """An axis's groups are the rows of the world's arange with that axis's base axes moved last:
    a partition, each group ordered by its coordinate on the axis."""
    names, dims = [n for n, _ in shape.base], [s for _, s in shape.base]
    world = np.arange(shape.world_size).reshape(dims)
    for axis, size in shape.sizes.items():
        parts = [names.index(p) for p in shape.parts(axis)]
        rows = np.moveaxis(world, parts, range(len(dims) - len(parts), len(dims)))
        ref = rows.reshape(-1, size).tolist()
        got = shape.groups(axis)
        assert sorted(got) == sorted(ref) and got == sorted(got)
        for g in got:
            assert [shape.coords(r)[axis] for r in g] == list(range(size))
            assert all(shape.members(r, axis) == g for r in g)


def _old_coords(plan, rank):  # the mesh's formulas for today's axes, as they were written
    tp_index, dp_index = rank % plan.tp, rank // plan.tp
    return {"tp": tp_index, "dp": dp_index, "zero": dp_index % plan.zero_group,
            "replica": dp_index // plan.zero_group}


def _old_members(plan, rank, axis):
    c = _old_coords(plan, rank)
    if axis == "tp":
        return [c["dp"] * plan.tp + t for t in range(plan.tp)]
    if axis == "dp":
        return [d * plan.tp + c["tp"] for d in range(plan.dp)]
    if axis == "zero":
        base = c["replica"] * plan.zero_group
        return [(base + z) * plan.tp + c["tp"] for z in range(plan.zero_group)]
    return [(r * plan.zero_group + c["zero"]) * plan.tp + c["tp"]
            for r in range(plan.dp // plan.zero_group)]


def test_todays_layout_is_unchanged():
    plans = [Plan(tp=tp, zero_group=zg).resolve(world)
             for world in (1, 2, 4, 8, 12, 16, 64) for tp in (1, 2, 4, 8) if world % tp == 0
             for zg in range(1, world // tp + 1) if (world // tp) % zg == 0]
    assert len(plans) == 68
    for plan in plans:
        assert mesh_shape(plan).sizes == {"tp": plan.tp, "dp": plan.dp, "zero": plan.zero_group,
                                          "replica": plan.dp // plan.zero_group,
                                          "pp": 1, "cp": 1, "sp": 1}
        for rank in range(plan.world_size):
            assert coords(plan, rank) == {**_old_coords(plan, rank), "pp": 0, "cp": 0, "sp": 0}
            for axis in ("tp", "dp", "zero", "replica"):
                assert members(plan, rank, axis) == _old_members(plan, rank, axis)
    shape = mesh_shape(Plan(dp=4, tp=2, zero_group=2).resolve(8))   # pinned by hand
    assert shape.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shape.groups("dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert shape.groups("zero") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert shape.groups("replica") == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.fixture
def fake_world():
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  registers backend "fake"
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def init(rank, world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def test_build_mesh_process_groups(fake_world):
    """On the fake process group: each axis's group holds exactly the ranks ``members`` names,
    also for a mesh over a subset of the world (mesh ranks mapped to world ranks)."""
    fake_world(13, 16)
    plan = Plan(tp=2, zero=1, zero_group=2)
    for ranks in (None, list(range(8, 16))):
        mesh = build_mesh(plan, ranks)
        world = ranks or list(range(16))
        assert mesh.rank == world.index(13) and set(mesh.groups) == {"tp", "dp", "zero", "replica"}
        for axis, pg in mesh.groups.items():
            expect = [world[m] for m in members(mesh.plan, mesh.rank, axis)]
            assert dist.get_process_group_ranks(pg) == expect
    assert build_mesh(plan, list(range(8))) is None


@pytest.mark.parametrize("base, derived, culprit", [
    ((("tp", 2), ("zero", 2)), (), "in that order"),
    ((("tp", 2), ("tp", 2)), (), "distinct"),
    ((("pipeline", 2),), (), "pipeline"),
    ((("tp", 0),), (), "'tp' must have a positive integer size, got 0"),
    ((("zero", 2), ("tp", 2)), (("dp", ("replica", "zero")),), "'dp'"),
    ((("zero", 2), ("tp", 2)), (("tp", ("zero",)),), "'tp'"),
])
def test_bad_mesh_shape(base, derived, culprit):
    with pytest.raises(ValueError, match=culprit):
        MeshShape(base, derived)


def test_reserved_axis_order():
    assert AXIS_ORDER == ("pp", "replica", "zero", "ep", "cp", "sp", "tp")
    with pytest.raises(ValueError, match="unknown mesh axis 'ep'"):
        mesh_shape(Plan(tp=2).resolve(4)).members(0, "ep")


# ------------------------------------------------------------------------------------- rules

def test_tuple_rules():
    plan = Plan(rules=(("mlp", ("tp", "ep")), ("embed", "cp"), ("norm", None)))
    assert plan.mesh_axes("mlp") == ("tp", "ep")
    assert plan.mesh_axes("embed") == ("cp",)
    assert plan.mesh_axes("norm") == () and plan.mesh_axes("vocab") == ()


@pytest.mark.parametrize("rules, culprit", [
    ((("vocab", "pipeline"),), "logical axis 'vocab' maps to unknown mesh axis 'pipeline'"),
    ((("mlp", "dp"),), "logical axis 'mlp' maps to unknown mesh axis 'dp'"),
    ((("mlp", "pp"),), "logical axis 'mlp' maps to unknown mesh axis 'pp'"),
    ((("mlp", ()),), r"logical axis 'mlp' maps to \(\); a rule maps to"),
    ((("mlp", ("tp", 3)),), r"logical axis 'mlp' maps to \('tp', 3\)"),
    ((("mlp", ["tp"]),), r"logical axis 'mlp' maps to \['tp'\]"),
    ((("mlp", ("tp", "tp")),), "names a mesh axis twice"),
    ((("mlp", "tp"), ("mlp", None)), "logical axis 'mlp' has two rules"),
    ((("mlp",),), r"each rule must be \(logical_axis, mesh_axes\), got \('mlp',\)"),
    ([("mlp", "tp")], r"plan.rules must be a tuple"),
])
def test_bad_rule_names_field_and_value(rules, culprit):
    with pytest.raises(ValueError, match="plan.rules") as e:
        Plan(rules=rules)
    assert e.match(culprit)


def test_two_dimensional_layout():
    """A [64, 96] weight: dim 0 over ep (4), dim 1 over tp × cp (2 × 3, tp major), ZeRO-3 over 5:
    pieces [16, 16], ZeRO rows ceil(16 / 5) = 4 (padded to 20). Every rank's piece is the chunk
    ``torch.chunk`` gives, and the pieces tile the array once per rank of the other axes."""
    plan = Plan(dp=5, zero=3, rules=(("embed", "ep"), ("mlp", ("tp", "cp")))).resolve(5)
    sizes = {**mesh_shape(plan).sizes, "ep": 4, "tp": 2, "cp": 3}
    lay = param_layout(plan, (64, 96), ("embed", "mlp"), "w", sizes)
    assert lay.split == (("ep",), ("tp", "cp")) and lay.tp_dim == 1
    assert lay.local_shape == (16, 16) and lay.shard_shape == (4, 16)
    full = torch.arange(64 * 96).reshape(64, 96)
    cover = torch.zeros(64, 96, dtype=torch.long)
    for e in range(4):
        for t in range(2):
            for c in range(3):
                r0, c0 = lay.offset({"ep": e, "tp": t, "cp": c, "zero": 1}, sizes)
                piece = full[r0:r0 + 16, c0:c0 + 16]
                assert torch.equal(piece, full.chunk(4, 0)[e].chunk(6, 1)[t * 3 + c])
                cover[r0:r0 + 16, c0:c0 + 16] += 1
    assert torch.equal(cover, torch.ones_like(cover))


def test_layout_of_todays_plans_keeps_tp_dim():
    """With the plan's own mesh, an axis the plan does not have (ep) has size 1; tp still splits
    and ``tp_dim`` names its dimension."""
    plan = Plan(tp=2, zero=2, rules=(("mlp", ("tp", "ep")), ("embed", None))).resolve(4)
    lay = param_layout(plan, (32, 48), ("embed", "mlp"), "w1")
    assert lay.split == ((), ("tp", "ep")) and lay.tp_dim == 1
    assert lay.local_shape == (32, 24) and lay.shard_shape == (16, 24)
    assert lay.offset(mesh_shape(plan).coords(3), mesh_shape(plan).sizes) == (0, 24)
    norm = param_layout(plan, (32,), ("embed",), "norm")
    assert norm.tp_dim is None and norm.local_shape == (32,) and norm.shard_shape == (16,)


def test_layout_errors_name_the_axis():
    plan = Plan(rules=(("embed", "tp"), ("mlp", ("tp", "ep")))).resolve(1)
    with pytest.raises(ValueError, match="w1 .* mesh axis 'tp' on dimensions 0 and 1"):
        param_layout(plan, (32, 48), ("embed", "mlp"), "w1")
    plan = Plan(rules=(("mlp", ("tp", "ep")),)).resolve(1)
    with pytest.raises(ValueError, match=r"mesh axes tp=2 × ep=4 = 8 must divide dimension 0 "
                                         r"\('mlp'\) of w2, which has size 36"):
        param_layout(plan, (36,), ("mlp",), "w2", {"tp": 2, "ep": 4})


def test_shard_rejects_an_axis_it_does_not_implement():
    cfg = llama.Config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                       intermediate_size=48)
    rules = tuple((a, ("tp", "ep") if a == "mlp" else m) for a, m in Plan().rules)
    with pytest.raises(ValueError, match="logical axis 'mlp' to mesh axis 'ep', which the planner "
                                         "does not implement yet"):
        shard(train.Step(cfg, optim.adamw(lr=1e-3)), Plan(rules=rules))


EXPERIMENT = """
from evo import Experiment, Plan, data, models, optim
experiment = Experiment(
    model=models.llama.Config(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
                              intermediate_size=48),
    data=data.Packed(folder=None, seq_len=16, micro_batch=1, micro_num=1),
    optimizer=optim.adamw(lr=1e-3), steps=1, run_dir=RUN_DIR)
"""


@pytest.mark.parametrize("mlp, culprit", [
    ("'pipeline'", "plan.rules: logical axis 'mlp' maps to unknown mesh axis 'pipeline'"),
    ("('tp', 'ep')", "logical axis 'mlp' to mesh axis 'ep', which the planner does not implement"),
])
def test_evo_train_with_a_rule_it_cannot_run(tmp_path, mlp, culprit):
    """One message naming the rule, exit status 2, no traceback."""
    run_dir = tmp_path / "run"
    exp = tmp_path / "exp.py"
    exp.write_text(EXPERIMENT.replace("RUN_DIR", repr(str(run_dir))))
    rules = "(" + "".join(f"({a!r}, {m!r}), " for a, m in Plan().rules if a != "mlp") + \
        f"('mlp', {mlp}))"
    r = subprocess.run([sys.executable, "-m", "evo", "train", str(exp), "--set",
                        f"plan.rules={rules}"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr
    assert culprit in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("evo: error") == 1 and not run_dir.exists()   # nothing written


def test_pipeline_and_sequence_axes_take_their_places():
    """pp outermost, then the data-parallel ranks, then cp, sp and tp innermost:
    rank = ((pp·dp + dp_index)·cp + cp_index)·sp·tp + sp_index·tp + tp_index."""
    plan = Plan(pp=2, cp=2, sp=2, tp=2, zero=1).resolve(32)
    assert plan.dp == 2 and plan.model_parallel == 16 and plan.world_size == 32
    shape = mesh_shape(plan)
    for rank in range(32):
        c = shape.coords(rank)
        assert rank == (((c["pp"] * 2 + c["dp"]) * 2 + c["cp"]) * 2 + c["sp"]) * 2 + c["tp"]
    assert shape.members(0, "pp") == [0, 16]
    assert shape.members(0, "dp") == [0, 8]
    assert shape.members(0, "cp") == [0, 4]
    assert shape.members(0, "sp") == [0, 2]


@pytest.mark.parametrize("fields, match", [
    (dict(pp_schedule="gpipe"), "plan.pp_schedule must be one of"),
    (dict(pp=2, pp_schedule="zbv", pp_virtual=1), "plan.pp_virtual must be 2"),
    (dict(pp=2, pp_schedule="interleaved"), "plan.pp_virtual >= 2"),
    (dict(pp=2, pp_virtual=2), "plan.pp_virtual must be 1"),
    (dict(pp=2, pp_layers=(3,)), "plan.pp_layers has 1 entries"),
    (dict(pp=2, pp_layers=(4, 0)), "stage 1 has no block"),
    (dict(pp=0), "plan.pp must be a positive integer"),
    (dict(sp=-1), "plan.sp must be a positive integer"),
    (dict(dp=4, ep=3), "plan.ep=3 must divide plan.dp=4"),
    (dict(weight_parallel=True), "plan.weight_parallel needs a sequence group"),
])
def test_bad_parallel_fields_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        Plan(**fields)


def test_resolve_leaves_dp_to_the_model_parallel_product():
    assert Plan(pp=2, tp=2).resolve(8).dp == 2
    assert Plan(cp=2, sp=2).resolve(8).dp == 2
    assert Plan(pp=2, pp_layers=[2, 2]).pp_layers == (2, 2)
    with pytest.raises(ValueError, match=r"plan.pp=2 × plan.cp=2 × plan.sp=1 × plan.tp=1 = 4 must divide"):
        Plan(pp=2, cp=2).resolve(6)
    with pytest.raises(ValueError, match="plan.ep=4 must divide plan.dp=2"):
        Plan(pp=2, ep=4).resolve(4)
