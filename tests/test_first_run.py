"""The first run as a new user makes it: README's first Python snippet runs as written,
and `make demo`'s runtime (requirements.txt) covers everything the demo imports."""
import os
import re
import subprocess
import sys
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_first_python_snippet_runs_as_written(tmp_path):
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    p = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip()


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """The distributions ``names`` need, transitively (as installed here)."""
    seen, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = metadata.requires(n) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in reqs if "extra ==" not in r]
    return seen


def test_the_demo_imports_nothing_beyond_requirements_txt(tmp_path):
    """Every third-party module the demo imports comes from a distribution that
    requirements.txt lists or that one of those needs."""
    lines = open(os.path.join(REPO, "requirements.txt")).read().splitlines()
    allowed = _closure({_name(x) for x in lines if x.strip() and not x.startswith("#")})
    code = ("import sys, runpy\nsys.argv = ['selfrag.demo', '--max-tokens', '2', '--device', 'cpu']\n"
            "try:\n    runpy.run_module('selfrag.demo', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('--modules--')\nprint('\\n'.join(sorted({m.split('.')[0] for m in list(sys.modules)})))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    modules = p.stdout.split("--modules--\n", 1)[1].split()
    dists = metadata.packages_distributions()
    ours = {"engine", "kernels", "selfrag", "tests", "benchmarks"}
    outside = {m: dists[m] for m in modules
               if m in dists and m not in ours and m not in sys.stdlib_module_names
               and not any(_name(d) in allowed for d in dists[m])}
    assert outside == {}
