"""The wheel a user installs: `pip wheel . --no-deps` -> a fresh virtual environment -> `scale-fast pretrain`.

Cheap on purpose: the wheel is built from a copy of the sources (the checkout stays clean), without
build isolation; the new environment gets no pip and no torch of its own -- this environment's
site-packages are appended to its path, so torch is not reinstalled -- and the wheel is installed by
this environment's pip (`pip --python`).  Everything lives under pytest's tmp_path and is removed.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["scale_fast", "setup.py", "pyproject.toml", "README.md", "LICENSE"]


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.mark.skipif(os.name != "posix", reason="venv layout (bin/) of POSIX")
def test_wheel_installs_and_pretrains(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in SHIPPED:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
    for junk in src.rglob("__pycache__"):
        shutil.rmtree(junk)
    try:
        run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
             "-q", "-w", str(tmp_path / "dist")])
        wheel = next((tmp_path / "dist").glob("scale_fast-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert any(n.startswith("scale_fast/backends/cpp/csrc/") and n.endswith(".cpp") for n in names)
        assert any(n.endswith("/LICENSE") for n in names)
        for field in ("Author: ", "License: MIT", "Classifier: ", "Description-Content-Type: text/markdown",
                      "# scale_fast"):
            assert field in meta, field

        venv = tmp_path / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        python = venv / "bin" / "python"
        purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
        # torch, numpy, tqdm from this environment, after the venv's own site-packages (where the wheel goes)
        ours = [p for p in dict.fromkeys([sysconfig.get_path("purelib"), *site.getsitepackages()]) if p]
        (purelib / "zz_host_packages.pth").write_text("\n".join(ours) + "\n")
        run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
             str(wheel)])

        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        where = run([str(python), "-c", "import scale_fast; print(scale_fast.__file__)"], cwd=tmp_path, env=env)
        assert where.stdout.strip().startswith(str(purelib)), where.stdout  # the wheel, not this checkout
        out = run([str(venv / "bin" / "scale-fast"), "pretrain", "--steps", "2", "--batch-size", "8", "--eval-size",
                   "16", "--eval-every", "0", "--threads", "1", "--no-progress", "--set", "hidden_size=32",
                   "--set", "jct_hidden_size=32", "--set", "embed_dim=16", "--out", str(tmp_path / "run")],
                  cwd=tmp_path, env=env)
        done = json.loads(out.stdout.strip().splitlines()[-1])
        assert done["event"] == "done" and done["step"] == 2 and 0.0 <= done["R@1"] <= 1.0
    finally:
        for name in ("src", "dist", "venv", "run"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)
