"""The clone's folder must not shadow the installed package when Python runs from the folder above it.

Users clone into a folder named ``bocompress``; from its parent, ``import bocompress`` used to
find that folder (no ``__init__.py``) as a namespace package, ahead of setuptools' default
editable finder (``module 'bocompress' has no attribute 'Client'``). ``make venv`` installs
editable with ``editable_mode=compat``: a path entry on ``sys.path``, where the real package
wins over a namespace folder. Measured here: a copy of the repository in ``<tmp>/bocompress``,
installed with the Makefile's own pip options into a fresh venv (dependencies from this
environment, nothing downloaded), imported from ``<tmp>``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.e2e.helpers import REPO_ROOT

IGNORE = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", "*.db", "node_modules", ".pytest_cache")


def _makefile_pip_options() -> list[str]:
    """The options of the Makefile's ``pip install ... -e '.[dev]'`` line (what ``make venv`` runs)."""
    for line in (REPO_ROOT / "Makefile").read_text().splitlines():
        if "pip install" in line and "-e " in line:
            words = shlex.split(line.split("pip install", 1)[1])
            out, skip = [], False
            for w in words:
                if skip:
                    skip = False
                    continue
                if w in ("-e", "-c"):  # the target and the constraints file are given below
                    skip = True
                    continue
                if w != "-q":
                    out.append(w)
            return out
    raise AssertionError("the Makefile has no editable pip install line")


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PIP_NO_INDEX": "1",
                               "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def test_clone_named_bocompress_does_not_shadow_the_package(tmp_path: Path) -> None:
    opts = _makefile_pip_options()
    assert "editable_mode=compat" in " ".join(opts), opts
    assert re.search(r"-c constraints/cpu-torch\.txt", (REPO_ROOT / "Makefile").read_text())
    clone = tmp_path / "bocompress"
    shutil.copytree(REPO_ROOT, clone, ignore=IGNORE)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
                .stdout.strip())
    # this environment's packages (setuptools, pip, torch...) as a plain path entry: its own .pth
    # files (the editable finder of the main checkout) are not run
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = "import bocompress, bocompress.service, bocompress.worker; print(bocompress.__file__); print(bocompress.Client.__name__)"

    before = _run([str(py), "-c", probe], tmp_path)  # not installed: the folder is a namespace package
    assert "has no attribute 'Client'" in before.stderr or str(clone) not in before.stdout, before

    inst = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *opts,
                 "-c", str(clone / "constraints" / "cpu-torch.txt"), "-e", str(clone)], tmp_path)
    assert inst.returncode == 0, inst.stderr[-3000:]
    after = _run([str(py), "-c", probe], tmp_path)
    assert after.returncode == 0, after.stderr[-3000:]
    lines = after.stdout.split()
    assert lines[0] == str(clone / "bocompress" / "__init__.py") and lines[1] == "Client", after.stdout
