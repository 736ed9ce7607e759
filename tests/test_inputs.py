"""Bad inputs at the boundary: each gets one clear error naming the culprit (exit 2 from the
command line, no traceback) before anything is trained or written."""
import os
import stat
import textwrap

import pytest
import torch

from test_cli import evo
from evo import Experiment, config, data, hf, optim
from evo.models import llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = llama.Config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=48, max_seq_len=256)
EXPERIMENT = textwrap.dedent("""
    from evo import Experiment, Plan, data, models, optim
    experiment = Experiment(
        model=models.llama.Config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                                  num_kv_heads=2, intermediate_size=48),
        data=data.Packed(folder=None, seq_len=32, micro_batch=2, micro_num=1, seed=3),
        optimizer=optim.adamw(lr=1e-3),
        steps=2,
        run_dir=RUN_DIR,
    )
""")


@pytest.fixture
def exp_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.replace("RUN_DIR", repr(str(tmp_path / "run"))))
    return str(path)


def one_error(r, *culprits):
    """Exit 2, one `evo: error:` line naming every culprit, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [x for x in r.stderr.splitlines() if x.startswith("evo: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for c in culprits:
        assert c in errors[0], (c, errors[0])
    return errors[0]


# --- (3) training and validation folders must not overlap ----------------------------------------

@pytest.mark.parametrize("valid, relation", [
    ("corpus", "is"), ("corpus/held", "contains"), ("corpus-link", "is"),
    ("corpus/./sub/..", "is"), (".", "is inside")])
def test_overlapping_train_and_valid_folders_are_refused(tmp_path, monkeypatch, valid, relation):
    (tmp_path / "corpus" / "held").mkdir(parents=True)
    (tmp_path / "corpus" / "sub").mkdir()
    os.symlink(tmp_path / "corpus", tmp_path / "corpus-link")
    monkeypatch.chdir(tmp_path)  # relative paths are resolved like absolute ones
    with pytest.raises(data.DataError) as e:
        data.Packed(folder="corpus", valid_folder=valid, seq_len=8)
    msg = str(e.value)
    assert f"Packed.folder='corpus' ({tmp_path / 'corpus'}) {relation} Packed.valid_folder=" \
           f"{valid!r}" in msg, msg


def test_separate_folders_and_a_shared_parent_are_accepted(tmp_path):
    p = data.Packed(folder=str(tmp_path / "train"), valid_folder=str(tmp_path / "valid"))
    assert p.valid_folder == str(tmp_path / "valid")
    # a sibling whose name starts with the other's is not inside it
    data.Packed(folder=str(tmp_path / "data"), valid_folder=str(tmp_path / "data-valid"))


def test_overlapping_folders_from_the_command_line(exp_file, tmp_path):
    r = evo("train", exp_file, "--set", f"data.folder={tmp_path}",
            "--set", f"data.valid_folder={tmp_path / 'held'}")
    one_error(r, "data.valid_folder", "Packed.folder", "contains", str(tmp_path / "held"))


# --- (5) positions beyond model.max_seq_len --------------------------------------------------------

def packed(**kw):
    return data.Packed(**{"folder": "corpus", "seq_len": 64, **kw})


@pytest.mark.parametrize("data_kw, positions, names", [
    ({"seq_len": 512}, 512, ["data.seq_len = 512"]),
    ({"seq_len": 512, "folder": None}, 512, ["data.seq_len"]),
    ({"seq_len": 128, "micro_batch": 4}, 512, ["data.micro_batch * data.seq_len = 4 * 128"])])
def test_positions_beyond_max_seq_len_are_refused(data_kw, positions, names):
    with pytest.raises(config.ConfigError) as e:
        Experiment(model=MODEL, data=packed(**data_kw), optimizer=optim.adamw(lr=1e-3))
    msg = str(e.value)
    for name in [*names, f"= {positions} exceeds model.max_seq_len = 256"]:
        assert name in msg, msg


@pytest.mark.parametrize("data_kw", [
    {"seq_len": 256}, {"seq_len": 64, "micro_batch": 4},
    {"seq_len": 256, "micro_batch": 4, "pack_sample_into_one": True},
    {"seq_len": 256, "micro_batch": 4, "folder": None}])
def test_positions_within_max_seq_len_are_accepted(data_kw):
    exp = Experiment(model=MODEL, data=packed(**data_kw), optimizer=optim.adamw(lr=1e-3))
    assert exp.data.positions <= exp.model.max_seq_len == 256


def test_the_loader_never_numbers_more_positions_than_the_check_allows(tmp_path):
    """Independent of the property: the positions a real loader emits, for a document longer than
    a row (folder data) and in dummy mode."""
    data.write_bin(str(tmp_path / "a.bin"), [list(range(1, 40)) * 20, [3] * 7])
    for cfg in (data.Packed(folder=str(tmp_path), seq_len=16, micro_batch=4, micro_num=2),
                data.Packed(folder=str(tmp_path), seq_len=16, micro_batch=4,
                            pack_sample_into_one=True),
                data.Packed(folder=None, seq_len=16, micro_batch=4, micro_num=4)):
        loader = data.Loader(cfg, vocab_size=50)
        top = max(int(next(loader)["positions"].max()) for _ in range(3)) + 1
        assert top == cfg.positions, (cfg, top)


def test_model_overrides_apply_first_so_either_order_works(exp_file):
    for order in (["data.seq_len=8192", "model.max_seq_len=8192"],
                  ["model.max_seq_len=8192", "data.seq_len=8192"]):
        exp = config.apply_overrides(config.load(exp_file), order)
        assert (exp.data.seq_len, exp.model.max_seq_len) == (8192, 8192)


def test_positions_from_the_command_line(exp_file):
    one_error(evo("plan", exp_file, "--world", "1", "--set", "data.seq_len=8192"),
              "--set data.seq_len=8192", "model.max_seq_len = 4096")


# --- (8) run_dir that is a file; evo plan --world 0 / -2 -------------------------------------------

def test_run_dir_that_is_an_existing_file(exp_file, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me\n")
    r = evo("train", exp_file, "--set", f"run_dir={tmp_path / 'notes.txt'}")
    one_error(r, "run_dir", str(tmp_path / "notes.txt"), "existing file")
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


@pytest.mark.parametrize("world", ["0", "-2", "two"])
def test_plan_world_must_be_positive(exp_file, world):
    line = one_error(evo("plan", exp_file, "--world", world), "--world", repr(world))
    assert "plan.dp" not in line and "ZeroDivision" not in line


# --- (9) argparse's exit status, hints, type names, --profile --------------------------------------

@pytest.mark.parametrize("args, culprit", [
    (["frobnicate"], "frobnicate"), (["train"], "experiment"),
    (["plan", "EXP"], "--world"), (["generate", "runs/x"], "--prompt")])
def test_argparse_errors_exit_2(exp_file, args, culprit):
    one_error(evo(*[exp_file if a == "EXP" else a for a in args]), culprit)


def test_export_hf_into_a_full_folder_names_the_flag(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    line = one_error(evo("export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")),
                     str(tmp_path / "out"), "--overwrite")
    assert "overwrite=True" not in line


@pytest.mark.parametrize("override, expected", [
    ("steps=abc", "--set steps=abc: expected an integer"),
    ("steps=1.5", "--set steps=1.5: expected an integer, got a number"),
    ("remat=yes", "--set remat=yes: expected a number"),
    ("tensorboard=maybe", "--set tensorboard=maybe: expected true or false"),
    ("optimizer.lr=[1]", "--set optimizer.lr=[1]: expected a number, got a list")])
def test_override_type_errors_read_as_english(exp_file, override, expected):
    with pytest.raises(config.ConfigError) as e:
        config.apply_overrides(config.load(exp_file), [override])
    assert str(e.value).startswith(expected), str(e.value)
    assert " a int" not in str(e.value) and " a float" not in str(e.value)


def test_profile_error_speaks_of_the_flag_typed(exp_file):
    line = one_error(evo("train", exp_file, "--profile", "3-4"), "--profile 3-4", "START:END")
    assert "--set" not in line


def test_export_hf_files_get_the_umasks_normal_mode(tmp_path):
    """Every file HF export writes has the mode a plainly created file gets here (0644 under the
    usual umask 022), not safetensors' 0600."""
    probe = tmp_path / "probe"
    probe.write_text("")
    normal = stat.S_IMODE(probe.stat().st_mode)
    params = llama.init(MODEL, seed=0)
    for shard_bytes in (None, 20_000):  # one file; several shards and an index
        out = tmp_path / f"hf-{shard_bytes}"
        hf.save_hf(MODEL, params, out, max_shard_bytes=shard_bytes)
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
        assert len(modes) >= 2 and set(modes.values()) == {oct(normal)}, modes
        assert torch.equal(hf.load_hf(out)[1]["embed"], params["embed"])
