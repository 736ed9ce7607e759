"""The Orbax hand-off: `evo export-orbax` writes params that orbax's own API restores bitwise equal
to the evo checkpoint (float32, and bfloat16 through ml_dtypes), with the logical axes beside them;
`init_from` reads such a directory back; evo itself never needs orbax."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from evo import checkpoint
from evo.models import llama
from evo.sharding import Plan
from evo.sharding.mesh import Mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = textwrap.dedent("""
    from evo import Experiment, Plan, data, models, optim
    experiment = Experiment(
        model=models.llama.Config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_size=48),
        data=data.Packed(folder=None, seq_len=16, micro_batch=2, micro_num=1, seed=3),
        optimizer=optim.adamw(lr=1e-2),
        steps=2, checkpoint_every=2, async_checkpoint=False, tensorboard=False,
        run_dir=RUN_DIR,
    )
""")


def evo(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "evo", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


def test_evo_imports_and_runs_without_orbax(tmp_path):
    """With orbax made unimportable: evo's modules load, and export-orbax says what to install."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["orbax"] = None  # an import of orbax now fails as if it were not installed
        import evo, evo.cli, evo.run, evo.orbax_io
        assert "jax" not in sys.modules and "orbax.checkpoint" not in sys.modules
        sys.argv = ["evo", "export-orbax", {str(tmp_path)!r}, "--out", {str(tmp_path / 'o')!r}]
        sys.exit(evo.cli.main())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=900)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("evo: error: ") and "pip install -e '.[orbax]'" in r.stderr, r.stderr


ocp = pytest.importorskip("orbax.checkpoint", reason="the orbax extra is not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-step run with a checkpoint, exported as float32 and as bfloat16."""
    root = tmp_path_factory.mktemp("orbax")
    exp = root / "exp.py"
    exp.write_text(EXPERIMENT.replace("RUN_DIR", repr(str(root / "run"))))
    r = evo("train", str(exp))
    assert r.returncode == 0, r.stderr[-3000:]
    for dtype in ("float32", "bfloat16"):
        r = evo("export-orbax", str(root / "run"), "--out", str(root / dtype), "--dtype", dtype)
        assert r.returncode == 0, r.stderr[-3000:]
    ckpt = checkpoint.resolve(str(root / "run"))
    cfg = checkpoint.model_config(checkpoint.read_index(ckpt), ckpt)
    params = checkpoint.load_params(ckpt, cfg, Mesh(Plan().resolve(1), 0))
    return root, cfg, params


def restore_with_orbax(path):
    """What a JAX program does: orbax's own API, no evo."""
    arrays = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(path, "evo"))
    return arrays, meta


def leaf(tree, name):
    for part in name.split("."):
        tree = tree[part]
    return np.asarray(tree)


def test_orbax_restores_the_float32_params_bitwise_with_their_axes(exported):
    root, cfg, params = exported
    arrays, meta = restore_with_orbax(str(root / "float32"))
    assert meta["axes"] == {k: list(a) for k, a in llama.axes(cfg).items()}
    assert meta["model"]["hidden_size"] == 32 and meta["dtype"] == "float32"
    for name, t in params.items():
        a = leaf(arrays, name)
        assert a.dtype == np.float32 and a.shape == tuple(t.shape), name
        assert np.array_equal(a.view(np.uint32), t.numpy().view(np.uint32)), name


def test_orbax_restores_the_bfloat16_params_bitwise(exported):
    import ml_dtypes
    root, cfg, params = exported
    arrays, meta = restore_with_orbax(str(root / "bfloat16"))
    assert meta["dtype"] == "bfloat16"
    for name, t in params.items():
        a = leaf(arrays, name)
        assert a.dtype == ml_dtypes.bfloat16, name
        expected = t.to(torch.bfloat16).view(torch.uint16).numpy()
        assert np.array_equal(a.view(np.uint16), expected), name


def test_read_back_is_bitwise_and_init_from_starts_from_it(exported, tmp_path):
    from evo import orbax_io
    root, cfg, params = exported
    cfg2, back = orbax_io.load(str(root / "float32"))
    assert cfg2 == cfg and sorted(back) == sorted(params)
    assert all(torch.equal(back[k].view(torch.int32), params[k].view(torch.int32)) for k in params)
    # a run started from the Orbax export and one started from the evo checkpoint itself take
    # the same first step: equal losses, to the bit
    losses = []
    for source in (root / "float32", root / "run"):
        run_dir = tmp_path / source.name
        r = evo("train", str(root / "exp.py"), "--set", f"init_from={source}", "--set", "steps=1",
                "--set", "checkpoint_every=0", "--set", f"run_dir={run_dir}")
        assert r.returncode == 0, r.stderr[-3000:]
        losses.append(json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert losses[0] == losses[1]


def test_export_refuses_a_full_folder_and_init_from_a_mismatched_model(exported, tmp_path):
    root, _, _ = exported
    r = evo("export-orbax", str(root / "run"), "--out", str(root / "float32"))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = evo("train", str(root / "exp.py"), "--set", f"init_from={root / 'float32'}",
            "--set", "model.hidden_size=64", "--set", f"run_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "model.hidden_size" in r.stderr and "Traceback" not in r.stderr
