"""Every code block of README.md and docs/*.md runs, so the documentation stays true to the code.

```python blocks run in a fresh namespace in a temporary working directory; one whose first line
is ``# torchrun --nproc-per-node N`` runs as a script under that command. ```console blocks run
as bash scripts (``set -e``) in one shared working directory that sees the repository's
``experiments/``, in the order they appear, so a later block can use a run an earlier one made.
A block whose first line is ``# not run: ...`` is skipped with that reason; console blocks that
install the project are skipped because CI runs exactly those commands itself (.ci/run)."""
import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import repo_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def blocks(lang):
    return [(os.path.relpath(f, REPO), i, code)
            for f in FILES
            for i, code in enumerate(re.findall(rf"```{lang}\n(.*?)```", open(f).read(), re.S))]


PYTHON, CONSOLE = blocks("python"), blocks("console")


def test_docs_have_code():
    assert any(f == "README.md" for f, _, _ in PYTHON)
    assert any(f == "README.md" for f, _, _ in CONSOLE)


def test_docs_use_only_runnable_block_kinds():
    """Every fenced block is python, console or plain text (indented or ``` without a language
    is prose output, not a command)."""
    for f in FILES:
        langs = set(re.findall(r"^```(\w+)", open(f).read(), re.M))
        assert langs <= {"python", "console"}, (f, langs)


@pytest.mark.parametrize("path, index, code", PYTHON, ids=[f"{f}#{i}" for f, i, _ in PYTHON])
def test_python_block_runs(path, index, code, tmp_path, monkeypatch):
    first = code.lstrip().splitlines()[0]
    if first.startswith("# not run"):
        pytest.skip(first)
    if first.startswith("# torchrun "):
        script = tmp_path / "block.py"
        script.write_text(code)
        args = first[len("# torchrun "):].split()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *args,
                            str(script)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=900, env=repo_env(OMP_NUM_THREADS="1"))
        assert r.returncode == 0, f"{path} block {index}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{path} block {index}", "exec"), {"__name__": "__docs__"})


@pytest.fixture(scope="module")
def console_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("console")
    os.symlink(os.path.join(REPO, "experiments"), d / "experiments")
    return d


@pytest.mark.parametrize("path, index, code", CONSOLE, ids=[f"{f}#{i}" for f, i, _ in CONSOLE])
def test_console_block_runs(path, index, code, console_dir):
    if code.lstrip().startswith("# not run"):
        pytest.skip(code.lstrip().splitlines()[0])
    if "pip install" in code:
        pytest.skip("installs the project: .ci/run runs these commands")
    bindir = os.path.dirname(sys.executable)
    env = repo_env(PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
                   OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=console_dir, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{path} block {index}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
