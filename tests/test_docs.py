"""Every ```python block of README.md and docs/*.md runs (each in a fresh namespace, in a temporary
working directory), so the documentation stays true to the code. A block whose first line is
`# not run: ...` (it needs several processes) is skipped."""
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
BLOCKS = [(os.path.relpath(f, REPO), i, code)
          for f in FILES
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", open(f).read(), re.S))]


def test_docs_have_code():
    assert any(f == "README.md" for f, _, _ in BLOCKS)


@pytest.mark.parametrize("path, index, code", BLOCKS,
                         ids=[f"{f}#{i}" for f, i, _ in BLOCKS])
def test_code_block_runs(path, index, code, tmp_path, monkeypatch):
    if code.lstrip().startswith("# not run"):
        pytest.skip(code.lstrip().splitlines()[0])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{path} block {index}", "exec"), {"__name__": "__docs__"})
