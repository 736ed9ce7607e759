"""Branch coverage of evo/sharding/ under the equivalence sweep (tests/test_sharding.py, its
torchrun workers included), with coverage.py::

    python scripts/sharding_coverage.py            # the table and every branch not taken

Prints, per file, the branches taken / all branches, then each branch never taken as
``file:line->line`` (a negative target means "exits the function"). Needs the dev extra
(``pip install -e '.[dev]'``: coverage). Takes as long as the sweep (1-2 minutes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(REPO, "evo", "sharding")


def measure(workdir: str) -> dict:
    """Run the sweep's tests under coverage (subprocesses too); coverage's JSON report."""
    rc = os.path.join(workdir, "coveragerc")
    with open(rc, "w") as f:
        f.write(f"[run]\nbranch = True\nparallel = True\nsource = {TARGET}\n"
                f"data_file = {os.path.join(workdir, '.coverage')}\npatch = subprocess\n")
    path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m",
                          "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sharding.py"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"sharding_coverage: error: the sweep failed:\n{run.stdout[-3000:]}")
    out = os.path.join(workdir, "coverage.json")
    for cmd in (["combine", "-q"], ["json", "-q", "-o", out]):
        subprocess.run([sys.executable, "-m", "coverage", *cmd, f"--rcfile={rc}"], cwd=workdir,
                       env=env, check=True)
    with open(out) as f:
        return json.load(f)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="evo-coverage-") as workdir:
        report = measure(workdir)
    print(f"{'file':28s} {'branches':>9s} {'taken':>6s} {'cover':>6s}")
    missing = []
    for path, data in sorted(report["files"].items()):
        s = data["summary"]
        name = os.path.relpath(os.path.join(REPO, path) if not os.path.isabs(path) else path,
                               REPO)
        pct = 100 * s["covered_branches"] / s["num_branches"] if s["num_branches"] else 100.0
        print(f"{name:28s} {s['num_branches']:9d} {s['covered_branches']:6d} {pct:5.1f}%")
        missing += [f"{name}:{a}->{b}" for a, b in data.get("missing_branches", [])]
    t = report["totals"]
    print(f"{'total':28s} {t['num_branches']:9d} {t['covered_branches']:6d} "
          f"{100 * t['covered_branches'] / t['num_branches']:5.1f}%")
    print("\nbranches not taken:" if missing else "\nevery branch taken")
    for m in missing:
        print("  " + m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
