"""What is specific to the compiled CPU backend (backend="cpp").

The float64-reference suite (test_contrastive, test_linear_ce, test_scale_loss, ...) runs
on "cpp" through conftest.BACKENDS whenever it is built.  Here: the build / fallback
machinery (a failed build degrades to torch with ONE warning), and the kernels' own code
paths -- many tiles with ragged edges, the online-max path, several threads, the at::mm
fallback of the tile GEMMs, many row blocks -- in bfloat16, float32 and float64.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import scale_fast as sf
from scale_fast import _dispatch
import scale_fast.backends.cpp  # noqa: F401  (sf.backends.cpp below)
from scale_fast.backends.cpp import _build
from conftest import LOW_RTOL, torch_gen

ROOT = Path(__file__).resolve().parents[1]
CPP = "cpp" in sf.available_backends()
needs_cpp = pytest.mark.skipif(not CPP, reason=f"backend 'cpp' not built: {_build.reason()}")


@pytest.fixture
def threads():
    """Run a test with a given number of intra-op threads, restored afterwards."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.fixture
def fresh_build(monkeypatch):
    """Forget the build attempt for the test (the dispatcher asks the backend again); restore it after."""
    saved = dict(_build._state)
    _build.reset()
    yield
    _build._state.update(saved)


# --------------------------------------------------------------------------- #
# build and fallback
# --------------------------------------------------------------------------- #
def test_import_does_not_build():
    code = ("import scale_fast, scale_fast.backends.cpp as cb\n"
            "from scale_fast.backends.cpp import _build\n"
            "assert not _build._state['tried'], 'import triggered the C++ build'\n"
            "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_failed_build_falls_back_with_one_warning(monkeypatch, fresh_build):
    def broken():
        raise RuntimeError("Error building extension 'scale_fast_cpu'\nfoo.cpp:1: error: simulated failure")

    monkeypatch.setattr(_build, "_compile", broken)
    monkeypatch.delenv("SCALE_FAST_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="backend='cpp'.*unavailable.*simulated failure") as record:
        backends = sf.available_backends()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert "cpp" not in backends and "torch" in backends
    assert not sf.backends.cpp.is_available()
    assert "simulated failure" in sf.backends.cpp.unavailable_reason()

    e = torch.randn(2, 6, 5, generator=torch_gen(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, whatever is called next
        assert _dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
        out = sf.multi_pair_info_nce(e)  # auto -> torch
        assert torch.isfinite(out).all()
        assert sf.backends.cpp.extension() is None
        with pytest.raises(ValueError, match="backend='cpp' is not available.*simulated failure"):
            sf.multi_pair_info_nce(e, backend="cpp")


def test_disabled_by_environment(monkeypatch, fresh_build):
    monkeypatch.setenv("SCALE_FAST_DISABLE_CPP", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "cpp" not in sf.available_backends()
    assert "SCALE_FAST_DISABLE_CPP" in sf.backends.cpp.unavailable_reason()


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-scale-fast")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _build._compile()


def test_build_settings():
    s = _build.build_settings()
    assert s["name"].startswith("scale_fast_cpu_")
    assert "-fopenmp" in s["extra_cflags"]
    assert s["build_directory"].name == s["name"]
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        assert "scale_fast" in str(s["build_directory"])
    assert _build.source_paths() and all(p.is_file() and p.suffix == ".cpp" for p in _build.source_paths())


def test_cache_key_hashes_every_source_and_the_flags(tmp_path, monkeypatch):
    """Two checkouts (or versions) with different sources or flags never share a build directory."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "a.cpp").write_text("int a;")
    (csrc / "common.h").write_text("#pragma once")
    monkeypatch.setattr(_build, "csrc_dir", lambda: csrc)
    key = _build.cache_key(["-O3"])
    assert key == _build.cache_key(["-O3"]) and len(key) == 12
    assert _build.cache_key(["-O2"]) != key
    (csrc / "common.h").write_text("#pragma once\n")  # a header counts too
    assert _build.cache_key(["-O3"]) != key
    key = _build.cache_key(["-O3"])
    (csrc / "b.cpp").write_text("int b;")  # a new file counts
    assert _build.cache_key(["-O3"]) != key
    assert _build.source_paths() == [csrc / "a.cpp", csrc / "b.cpp"]


def test_cache_key_names_the_torch_install(monkeypatch):
    """Two venvs with the same torch version compile with other include and library paths: other folders."""
    from torch.utils import cpp_extension

    key = _build.cache_key(["-O3"])
    monkeypatch.setattr(cpp_extension, "_TORCH_PATH", "/elsewhere/venv/lib/python3.11/site-packages/torch")
    other = _build.cache_key(["-O3"])
    assert other != key
    monkeypatch.setattr(cpp_extension, "TORCH_LIB_PATH", "/elsewhere/venv/lib/python3.11/site-packages/torch/lib")
    assert _build.cache_key(["-O3"]) not in (key, other)


def test_available_backends_and_explain_never_compile(tmp_path, monkeypatch, fresh_build):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built here
    monkeypatch.delenv("SCALE_FAST_DISABLE_CPP", raising=False)
    monkeypatch.delenv("SCALE_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_build, "_check_tools", lambda: None)
    monkeypatch.setattr(_build, "_compile", lambda: pytest.fail("compiled"))
    reasons = sf.available_backends(with_reasons=True)
    assert reasons["cpp"] == _build.NOT_BUILT and "cpp" not in sf.available_backends()
    assert "scale-fast build-ext" in _build.NOT_BUILT and "first use" in _build.NOT_BUILT
    e = torch.randn(3, 4, 5)
    assert sf.explain_backend("contrastive", e, backend="cpp") == (
        f"contrastive[cpu, float32, M=3] -> cpp: backend='cpp' requested ({_build.NOT_BUILT})")
    assert sf.explain_backend("contrastive", e).endswith(f"prefers cpp on cpu ({_build.NOT_BUILT})")
    assert not _build._state["tried"] and not list(tmp_path.iterdir())

    def build_now():
        raise RuntimeError("compiler ran")

    monkeypatch.setattr(_build, "_compile", build_now)  # build=True: what a first use does
    with pytest.warns(RuntimeWarning, match="compiler ran"):
        assert "compiler ran" in sf.available_backends(with_reasons=True, build=True)["cpp"]


# A second environment without making one: torch "installed" at another path (links to this torch's
# include and lib folders, as another venv's copy of the same version), and tiny sources that compile in
# seconds.  A sitecustomize sets both up in every process, the build child included.
SITECUSTOMIZE = """
import os
from pathlib import Path
if os.environ.get("SF_TEST_TORCH_PATH"):
    from torch.utils import cpp_extension
    cpp_extension._TORCH_PATH = os.environ["SF_TEST_TORCH_PATH"]
    cpp_extension.TORCH_LIB_PATH = os.path.join(cpp_extension._TORCH_PATH, "lib")
if os.environ.get("SF_TEST_CSRC"):
    from scale_fast.backends.cpp import _build
    _build.csrc_dir = lambda: Path(os.environ["SF_TEST_CSRC"])
"""
TINY_SOURCE = """#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("one", [] { return 1; }); }
"""
USE_EXTENSION = """
from scale_fast.backends.cpp import _build
ext = _build.extension()  # what every backend="cpp" op calls
assert ext is not None, _build.reason()
lib = _build.library_path(_build.build_settings())
print(ext.one(), lib, lib.stat().st_mtime_ns)
"""


@pytest.mark.skipif(os.name != "posix", reason="symlinked torch install (POSIX)")
def test_two_environments_build_once_each(tmp_path):
    """Alternating between two environments with the same torch: one build each, announced, never again
    (the second environment's include paths once made ninja rebuild the shared folder on every switch)."""
    import torch.utils.cpp_extension as cpp_extension

    if not (shutil.which(os.environ.get("CXX", "c++")) and cpp_extension.is_ninja_available()):
        pytest.skip("no compiler or ninja")
    site, csrc, other_torch = tmp_path / "site", tmp_path / "csrc", tmp_path / "venv2" / "torch"
    for folder in (site, csrc, other_torch):
        folder.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (csrc / "tiny.cpp").write_text(TINY_SOURCE)
    this_torch = Path(torch.__file__).resolve().parent
    for name in ("include", "lib"):
        (other_torch / name).symlink_to(this_torch / name)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SCALE_FAST_", "SF_TEST_"))}
    base.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), SF_TEST_CSRC=str(csrc),
                PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    envs = {"a": base, "b": {**base, "SF_TEST_TORCH_PATH": str(other_torch)}}
    seen = {}
    for step, name in enumerate("abab"):
        out = subprocess.run([sys.executable, "-c", USE_EXTENSION], capture_output=True, text=True,
                             env=envs[name], timeout=600)
        assert out.returncode == 0, out.stderr
        one, lib, mtime = out.stdout.split()
        announced = [line for line in out.stderr.splitlines() if "compiling the C++ CPU kernels" in line]
        assert one == "1"
        if step < 2:  # the first use in each environment builds, and says so in one line
            assert len(announced) == 1, out.stderr
            seen[name] = (lib, mtime)
        else:  # then its own library is used as it is: no line, no rebuild
            assert announced == [] and (lib, mtime) == seen[name], (name, out.stderr)
    assert seen["a"][0] != seen["b"][0]


OWNER_THEN_KILLED = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
os.kill(os.getpid(), signal.SIGKILL)  # a build killed while holding the lock
"""


@pytest.mark.skipif(_build.fcntl is None, reason="flock (POSIX)")
def test_stale_lock_of_a_killed_build_is_taken_over(tmp_path):
    lock = _build.BuildLock(tmp_path)
    dead = subprocess.run([sys.executable, "-c", OWNER_THEN_KILLED, str(lock.path)], timeout=60)
    assert dead.returncode == -9
    (tmp_path / "lock").touch()  # torch's own lock file, also left behind
    assert lock.owner() not in (None, os.getpid())  # the killed process's PID is on record
    waited = []
    lock.acquire(on_wait=waited.append)  # at once: the kernel dropped the dead owner's flock
    try:
        assert waited == [] and lock.owner() == os.getpid()
    finally:
        lock.release()


@pytest.mark.skipif(_build.fcntl is None, reason="flock (POSIX)")
def test_lock_waits_for_a_live_owner_and_names_it(tmp_path):
    import threading
    import time

    first, second = _build.BuildLock(tmp_path), _build.BuildLock(tmp_path)
    first.acquire()
    waited, done = [], threading.Event()

    def take():
        second.acquire(on_wait=waited.append)
        done.set()

    thread = threading.Thread(target=take)
    thread.start()
    try:
        deadline = time.monotonic() + 300
        while not waited and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waited == [os.getpid()]  # it says whose build it waits for
        assert not done.wait(0.3)  # and stays blocked while the owner lives
    finally:
        first.release()
        thread.join(300)
    assert done.is_set()
    second.release()


def test_torch_lock_is_removed_under_ours(tmp_path, monkeypatch):
    """torch waits forever on <dir>/lock when a build was killed; under our lock that file is stale."""
    from torch.utils import cpp_extension

    build_dir = tmp_path / "scale_fast_cpu_x_0123456789ab"
    build_dir.mkdir()
    (build_dir / "lock").touch()
    seen = {}

    def fake_load(**kw):
        seen["torch_lock"] = (build_dir / "lock").exists()
        seen["owner"] = _build.BuildLock(build_dir).owner()
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    settings = {"name": build_dir.name, "extra_cflags": [], "extra_ldflags": [], "build_directory": build_dir}
    assert _build._load(settings) == "module"
    assert seen == {"torch_lock": False, "owner": os.getpid()}


def test_sources_compile_from_one_copy_whatever_the_checkout(tmp_path, monkeypatch):
    """Two checkouts (or a checkout and a wheel install) with the same sources share one build: the
    compiled paths are the copy in the build directory, so ninja sees nothing to rebuild."""
    from torch.utils import cpp_extension

    compiled = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: compiled.append(kw["sources"]))
    build_dir = tmp_path / "build"
    for checkout in ("a", "b"):
        csrc = tmp_path / checkout / "csrc"
        csrc.mkdir(parents=True)
        (csrc / "k.cpp").write_text('#include "k.h"')
        (csrc / "k.h").write_text("int k;")
        monkeypatch.setattr(_build, "csrc_dir", lambda csrc=csrc: csrc)
        _build._load({"name": "x", "extra_cflags": [], "extra_ldflags": [], "build_directory": build_dir})
    assert compiled[0] == compiled[1] == [str(build_dir / "src" / "k.cpp")]
    assert (build_dir / "src" / "k.h").read_text() == "int k;"


def test_library_that_does_not_load_is_rebuilt_with_one_line(tmp_path, monkeypatch, capsys):
    """A library found in its folder is imported as it is; one left half-written by a killed build is relinked."""
    from torch.utils import cpp_extension

    settings = {"name": "scale_fast_cpu_x_0123456789ab", "extra_cflags": [], "extra_ldflags": [],
                "build_directory": tmp_path / "scale_fast_cpu_x_0123456789ab"}
    settings["build_directory"].mkdir()
    _build.library_path(settings).write_bytes(b"\x7fELF truncated")
    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append(kw["name"]) or "module")
    assert _build._load(settings) == "module" and built == [settings["name"]]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "rebuilding the C++ CPU kernels" in err[0] and "does not load" in err[0], err


def test_first_build_says_so_in_one_line_and_builds_in_a_child(tmp_path, monkeypatch, capsys):
    settings = {"name": "scale_fast_cpu_x_0123456789ab", "extra_cflags": [], "extra_ldflags": [],
                "build_directory": tmp_path / "scale_fast_cpu_x_0123456789ab"}
    calls = []
    monkeypatch.setattr(_build, "_check_tools", lambda: None)
    monkeypatch.setattr(_build, "build_settings", lambda: settings)
    monkeypatch.setattr(_build, "_build_in_child", lambda s: calls.append("child"))
    monkeypatch.setattr(_build, "_load", lambda s: calls.append("load") or "module")
    assert _build._compile() == "module" and calls == ["child", "load"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "compiling the C++ CPU kernels" in err[0] and "minute" in err[0], err
    settings["build_directory"].mkdir()
    _build.library_path(settings).touch()  # built: loaded without a word
    calls.clear()
    assert _build._compile() == "module" and calls == ["load"]
    assert capsys.readouterr().err == ""


FAKE_BUILDER = """
import subprocess, sys, time
compiler = subprocess.Popen(["sleep", "60"])  # stands for ninja's compiler, in the builder's group
open(sys.argv[1], "w").write(str(compiler.pid))
time.sleep(60)
"""


@pytest.mark.skipif(os.name != "posix", reason="process groups (POSIX)")
def test_interrupted_build_leaves_no_orphan_compiler(tmp_path, monkeypatch):
    import signal
    import threading
    import time

    pid_file = tmp_path / "compiler.pid"
    monkeypatch.setattr(_build, "_builder_command", lambda: [sys.executable, "-c", FAKE_BUILDER, str(pid_file)])

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    def send_when_compiling():
        deadline = time.monotonic() + 300
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR1)  # stands for Ctrl-C in the training process

    previous = signal.signal(signal.SIGUSR1, interrupt)
    sender = threading.Thread(target=send_when_compiling)
    sender.start()
    try:
        with pytest.raises(Interrupted):
            _build._build_in_child({})
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, previous)
    compiler = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(compiler) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(compiler), "the compiler outlived the interrupted build"


LOAD_BUILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sf_build", sys.argv[1])
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)  # _build imports torch only inside its functions: these processes start fast
"""
CHILD_OF_A_DYING_PARENT = LOAD_BUILD + """
import subprocess, time
build.run_as_child()  # what the real build child does first
compiler = subprocess.Popen(["sleep", "60"])
open(sys.argv[2], "w").write(str(compiler.pid))
time.sleep(60)
"""
DYING_PARENT = LOAD_BUILD + """
build._builder_command = lambda: [sys.executable, "-c", sys.argv[3], sys.argv[1], sys.argv[2]]
build._build_in_child({})
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG (Linux)")
def test_killed_parent_leaves_no_orphan_compiler(tmp_path):
    """SIGKILL (or a closed terminal) gives the parent no chance to clean up: the child ends its group."""
    import time

    pid_file = tmp_path / "compiler.pid"
    parent = subprocess.Popen([sys.executable, "-c", DYING_PARENT, _build.__file__, str(pid_file),
                               CHILD_OF_A_DYING_PARENT])
    deadline = time.monotonic() + 300
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    parent.kill()
    parent.wait()
    compiler = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(compiler) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(compiler), "the compiler outlived its killed parent"


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@needs_cpp
def test_prebuild_command_prints_the_library():
    out = subprocess.run([sys.executable, "-m", "scale_fast.cli", "build-ext"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.name.startswith("scale_fast_cpu_") and path.parent.name == path.stem


@needs_cpp
def test_auto_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("SCALE_FAST_BACKEND", raising=False)
    want = "cpp" if "cpu" in sf.backends.cpp.CAPABILITY.preferred_on else "torch"
    assert _dispatch.resolve_backend("auto", torch.device("cpu")) == want
    monkeypatch.setenv("SCALE_FAST_BACKEND", "torch")
    assert _dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"


# --------------------------------------------------------------------------- #
# contrastive kernels
# --------------------------------------------------------------------------- #
def _contrastive_case(seed, **kw):
    from test_contrastive import _run_case

    return _run_case("cpp", seed, **kw)


@needs_cpp
@pytest.mark.parametrize("form", ["ntxent", "clip"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_contrastive_dtypes(form, dtype):
    tol = dict(rtol=LOW_RTOL, grtol=LOW_RTOL) if dtype == torch.bfloat16 else {}
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, grtol=1e-10)
    for seed in range(3):
        out = _contrastive_case(1100 + seed, M=3, B=[40, 77, 130][seed], D=[16, 33, 64][seed], pattern="random",
                                form=form, wkind="BMM", scale_kind="tensor", dtype=dtype, **tol)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.fixture(params=[1, 2, 3], ids=["1thread", "2threads", "3threads"])
def tiny_tiles(request, monkeypatch, threads):
    """16-row tiles (many ragged tiles from small inputs), on 1, 2 and 3 intra-op threads (the backward's
    panels: one, an even and an odd count)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("scale_fast.backends.cpp.contrastive"), "TILE", 16)
    threads(request.param)


@needs_cpp
@pytest.mark.parametrize("form", ["ntxent", "clip"])
def test_contrastive_many_tiles(tiny_tiles, form):
    """Tiny tiles: ragged last tiles, diagonal and off-diagonal tiles, thread-local sums, backward rounds."""
    for k, (B, pattern, wkind) in enumerate([(17, "random", "BMM"), (50, "mixed", "MM"), (101, "all", None)]):
        _contrastive_case(1200 + k, M=3, B=B, D=33, pattern=pattern, form=form, wkind=wkind, scale_kind="tensor")
        _contrastive_case(1210 + k, M=3, B=B, D=9, pattern=pattern, form=form, wkind=wkind, scale_kind="tensor",
                          dtype=torch.float64, rtol=1e-10, grtol=1e-10)


@needs_cpp
@pytest.mark.parametrize("form", ["ntxent", "clip"])
def test_contrastive_online_max_path(tiny_tiles, form):
    """|s w| large: the online max replaces the fixed shift (float32 at 2 max|s w| > 60), over many tiles."""
    from conftest import assert_grad_close, assert_value_close, case_rng, make_embeddings, make_present, ref_leaf
    from reference import ref_pair_losses

    for seed, (B, s_val) in enumerate([(45, 100.0), (70, 40.0), (33, 31.0)]):
        gen = torch_gen(1300 + seed)
        present = make_present(case_rng("cpp-online", seed), 3, B, "random")
        e = make_embeddings(gen, present, 16)
        w = torch.rand(B, 3, 3, generator=gen) + 0.5  # |s w| up to 1.5 s
        e_dev, w_dev = e.clone().requires_grad_(), w.clone().requires_grad_()
        s_dev = torch.tensor(s_val, requires_grad=True)
        out = sf.multi_pair_info_nce(e_dev, present, logit_scale=s_dev, weights=w_dev, form=form, backend="cpp")
        e_r, w_r, s_r = ref_leaf(e), ref_leaf(w), ref_leaf(s_dev)
        ref = ref_pair_losses(e_r, present, s_r, w_r, form)
        assert_value_close(out, ref, 1e-5, 2e-7 * 1.5 * s_val, f"{form} losses at s={s_val}")
        g_lib = torch.autograd.grad(out.sum(), [e_dev, w_dev, s_dev])
        g_ref = torch.autograd.grad(ref.sum(), [e_r, w_r, s_r])
        for name, a, b in zip(("embeddings", "weights", "logit_scale"), g_lib, g_ref):
            assert_grad_close(a, b, name=f"{form} d {name}")


@needs_cpp
def test_tile_gemm_through_aten():
    """The tile GEMMs through at::mm (used where torch exports no BLAS) give the same results."""
    ext = sf.backends.cpp.extension()
    u = torch.nn.functional.normalize(torch.randn(70, 19, generator=torch_gen(3)), dim=1)
    rs = torch.rand(70, generator=torch_gen(4)) * 20
    a, b = u[:35].contiguous(), u[35:].contiguous()
    cos_pos = (a * b).sum(1)  # the positives' cosines
    try:
        ext.set_direct_blas(False)
        lse_aten = ext.ntxent_forward(u, rs, 16)
        du_aten = ext.ntxent_backward(u, rs, lse_aten, cos_pos.repeat(2), 0.5, 16)[0]
        cross_aten = ext.cross_backward(a, b, rs[:35].contiguous(), lse_aten[:35].contiguous(),
                                        lse_aten[35:].contiguous(), cos_pos, 0.5, 16)
        _contrastive_case(1400, M=3, B=40, D=16, pattern="random", form="ntxent", wkind="BMM", scale_kind="tensor")
        pos = torch.arange(35)
        siglip_aten = [ext.siglip_forward(a, b, rs[:35].contiguous(), pos, -3.0, 16)] + \
            list(ext.siglip_backward(a, b, rs[:35].contiguous(), pos, -3.0, 0.5, 16))
    finally:
        ext.set_direct_blas(True)
    lse = ext.ntxent_forward(u, rs, 16)
    du = ext.ntxent_backward(u, rs, lse, cos_pos.repeat(2), 0.5, 16)[0]
    cross = ext.cross_backward(a, b, rs[:35].contiguous(), lse[:35].contiguous(), lse[35:].contiguous(), cos_pos,
                               0.5, 16)
    torch.testing.assert_close(lse, lse_aten, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(du, du_aten, rtol=1e-5, atol=1e-6)
    for x, y in zip(cross, cross_aten):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    siglip = [ext.siglip_forward(a, b, rs[:35].contiguous(), pos, -3.0, 16)] + \
        list(ext.siglip_backward(a, b, rs[:35].contiguous(), pos, -3.0, 0.5, 16))
    for x, y in zip(siglip, siglip_aten):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_info_nce_task_dtypes():
    """The "nce" masked task (one-direction InfoNCE) in bf16 / float64 against torch in float64."""
    from scale_fast.backends.cpp.ops import info_nce as cpp_nce
    from scale_fast.backends.torch.ops import info_nce as torch_nce

    gen = torch_gen(7)
    a = torch.nn.functional.normalize(torch.randn(300, 24, generator=gen, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(300, 24, generator=gen, dtype=torch.float64), dim=1)
    w = torch.rand(300, generator=gen, dtype=torch.float64) + 0.5
    ref_leaves = [x.clone().requires_grad_() for x in (a, b, w)]
    ref = torch_nce(*ref_leaves, 14.0)
    ref_g = torch.autograd.grad(ref, ref_leaves)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, LOW_RTOL)):
        leaves = [x.to(dtype).requires_grad_() for x in (a, b, w)]
        out = cpp_nce(*leaves, 14.0)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)
        for g, r in zip(torch.autograd.grad(out, leaves), ref_g):
            assert g.dtype == dtype
            assert float((g.double() - r).norm() / r.norm()) <= max(tol, 1e-4 if dtype == torch.float32 else tol)


# --------------------------------------------------------------------------- #
# siglip kernels
# --------------------------------------------------------------------------- #
class _CountingExtension:
    """The compiled module, recording the calls of its siglip kernels."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def __getattr__(self, name):
        fn = getattr(self.ext, name)
        if not name.startswith("siglip"):
            return fn

        def counted(*args, **kw):
            self.calls.append(name)
            return fn(*args, **kw)

        return counted


@needs_cpp
def test_siglip_runs_on_cpp(monkeypatch):
    """backend="cpp" and "auto" on CPU run siglip (and its row_range form) on the compiled kernels, no fallback."""
    import importlib

    monkeypatch.delenv("SCALE_FAST_BACKEND", raising=False)
    e = torch.randn(3, 9, 5, generator=torch_gen(5))
    for backend, why in (("cpp", "backend='cpp' requested"), ("auto", "backend='auto' prefers cpp on cpu")):
        assert sf.explain_backend("siglip", e, backend=backend) == f"siglip[cpu, float32, M=3] -> cpp: {why}"
    assert sf.explain_backend("siglip", e, backend="cpp", row_range=True).endswith("-> cpp: backend='cpp' requested")
    assert _dispatch.get_op("cpp", "siglip", e) is sf.backends.cpp.ops.siglip
    assert _dispatch.get_op("cpp", "siglip", e, row_range=True) is sf.backends.cpp.ops.siglip
    kernels = importlib.import_module("scale_fast.backends.cpp.siglip")
    spy = _CountingExtension(kernels._ext())
    monkeypatch.setattr(kernels, "_ext", lambda: spy)
    e.requires_grad_()
    sf.multi_pair_info_nce(e, logit_bias=-2.0, form="siglip", backend="cpp").sum().backward()
    assert spy.calls == ["siglip_forward"] * 3 + ["siglip_backward"] * 3  # the 3 pairs of M = 3


@needs_cpp
def test_siglip_many_tiles(tiny_tiles):
    """16-row tiles on 1 and 2 threads (ragged tiles, positives in every tile), B=1, odd D, absent
    modalities with NaN rows, a pair with one common sample, negative row weights, logits far in
    both tails of the softplus (|s w| + |bias| up to ~250): float64, float32 and bfloat16 against the
    float64 reference, values and the gradients of embeddings, logit_scale, logit_bias and weights."""
    from conftest import case_rng, make_embeddings, make_present
    from test_siglip import check_against_reference

    cases = [  # (M, B, D, present pattern, weights, logit_scale, logit_bias)
        (3, 1, 7, "all", False, 10.0, -10.0),
        (2, 17, 33, "all", True, 1 / 0.07, -10.0),
        (3, 50, 9, "mixed", True, 100.0, 5.0),
        (4, 101, 16, "absent_modality", False, 30.0, -30.0),
        (3, 70, 65, "n1", True, 2.5, 0.0),
        (3, 40, 8, "sparse", True, 1.0, 1.5),
    ]
    for k, (M, B, D, pattern, weighted, s, b) in enumerate(cases):
        present = make_present(case_rng("cpp-siglip", k), M, B, pattern)
        gen = torch_gen(2000 + k)
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            e = make_embeddings(gen, present, D, fill="nan", dtype=dtype)
            w = torch.rand(B, M, M, generator=gen, dtype=torch.float64) * 2.0 - 0.5 if weighted else None
            check_against_reference("cpp", k, dtype, present, e, w, s, b)


@needs_cpp
def test_siglip_kernels_deterministic(tiny_tiles):
    """For a given thread count the siglip kernels give bitwise the same results, call after call."""
    ext = sf.backends.cpp.extension()
    gen = torch_gen(2200)
    q = torch.nn.functional.normalize(torch.randn(70, 19, generator=gen), dim=1)
    k = torch.nn.functional.normalize(torch.randn(90, 19, generator=gen), dim=1)
    rs, pos = torch.rand(70, generator=gen) * 20, torch.randperm(90, generator=gen)[:70]

    def run():
        return [ext.siglip_forward(q, k, rs, pos, -3.0, 16)] + list(ext.siglip_backward(q, k, rs, pos, -3.0, 0.5, 16))

    first = run()
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(run(), first))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_siglip_row_range_partition(tiny_tiles, dtype):
    """The row_range form (the process-group path): the partial losses of a partition of the batch sum
    to the full loss and gradients; in float64 both equal the torch backend's."""
    from conftest import make_embeddings
    from scale_fast.backends.cpp.ops import siglip as cpp_siglip
    from scale_fast.backends.torch.ops import siglip as torch_siglip

    M, B, D = 3, 37, 11
    gen = torch_gen(2100)
    present = torch.rand(M, B, generator=gen) < 0.7
    present[:, 0] = True
    e = make_embeddings(gen, present, D, fill="nan", dtype=dtype).requires_grad_()
    w = (torch.rand(B, M, M, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    s = torch.tensor(12.0, dtype=dtype, requires_grad=True)
    b = torch.tensor(-4.0, dtype=dtype, requires_grad=True)
    coef = torch.randn(M, M, generator=gen, dtype=dtype)
    leaves = [e, w, s, b]

    def run(op, ranges):
        if ranges is None:
            out = op(e, present, s, b, w)
        else:
            out = sum(op(e, present, s, b, w[lo:hi], (lo, hi)) for lo, hi in ranges)
        return out, torch.autograd.grad((out * coef).sum(), leaves)

    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    full, g_full = run(cpp_siglip, None)
    parts, g_parts = run(cpp_siglip, [(0, 16), (16, 17), (17, 37)])  # one range inside a 16-row tile
    wants = [(full, g_full)]
    if dtype == torch.float64:
        wants.append(run(torch_siglip, None))
    for want, g_want in wants:
        torch.testing.assert_close(parts, want, **tol)
        for name, x, y in zip(("embeddings", "weights", "logit_scale", "logit_bias"), g_parts, g_want):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"d {name}: {m}")


# --------------------------------------------------------------------------- #
# linear cross-entropy kernels
# --------------------------------------------------------------------------- #
def _lce(seed, **kw):
    from test_linear_ce import _make

    return _make("cpp", seed, **kw)


def _lce_check(case, **kw):
    from test_linear_ce import _check

    return _check("cpp", case, **kw)


@needs_cpp
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_linear_ce_dtypes(soft, dtype):
    tol = dict(rtol=LOW_RTOL, atol=LOW_RTOL, grtol=LOW_RTOL) if dtype == torch.bfloat16 else \
        dict(rtol=1e-10, atol=1e-12, grtol=1e-10)
    for k, reduction in enumerate(("mean", "sum", "none")):
        _lce_check(_lce(1500 + k, soft=soft, reduction=reduction, scale_kind="rows", bias=True, N=37, H=24, K=301,
                        ignore_frac=0.2, dtype=dtype), **tol)


@needs_cpp
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("soft", [False, True])
def test_linear_ce_many_blocks(monkeypatch, threads, soft, nthreads):
    """4 rows per chunk (the power of two under a 7-row cap; ragged last chunk), row-parallel fused pass."""
    import importlib

    driver = importlib.import_module("scale_fast.backends._lce_driver")
    monkeypatch.setattr(driver, "HOST_CHUNK_BYTES", 7 * 101 * 4)
    monkeypatch.setattr(driver, "HOST_MIN_ROWS", 1)
    threads(nthreads)
    for k, reduction in enumerate(("mean", "sum", "none")):
        for scale_kind in (None, "rows"):
            _lce_check(_lce(1600 + k, soft=soft, reduction=reduction, scale_kind=scale_kind, bias=True, N=53, H=33,
                            K=101, ignore_frac=0.25))


@needs_cpp
def test_linear_ce_large_logits_and_odd_sizes():
    """Logits in the hundreds (no overflow: the row max is the shift) and K not a multiple of 8."""
    case = _lce(1700, soft=False, reduction="mean", scale_kind="float", bias=True, N=65, H=7, K=1003)
    case["hidden"] = case["hidden"] * 40
    _lce_check(case)


@needs_cpp
def test_linear_ce_retained_graph_recomputes(monkeypatch):
    """The eager gradients are handed to autograd once; a second backward recomputes them."""
    case = _lce(1800, soft=True, reduction="mean", scale_kind="rows", bias=True, N=20, H=16, K=50)
    h = case["hidden"].float().requires_grad_()
    W = case["weight"].float().requires_grad_()
    q = case["target"].float().requires_grad_()
    out = sf.linear_cross_entropy(h, W, q, scale=case["scale"].float(), backend="cpp")
    g1 = torch.autograd.grad(out, [h, W, q], retain_graph=True)
    g2 = torch.autograd.grad(3 * out, [h, W, q])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(3 * a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- #
# scores (per-sample Gram in C++)
# --------------------------------------------------------------------------- #
@needs_cpp
@pytest.mark.parametrize("mode", ["sample", "batch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_scores_op(mode, dtype):
    """The cpp scores op against the float64 reference: NaN in absent rows, rows below the 1e-12 clamp, B=1."""
    from conftest import assert_grad_close, assert_rows_zero_grad, assert_value_close, case_rng, make_embeddings, \
        make_present, ref_leaf
    from reference import ref_scores

    from scale_fast.backends.cpp.ops import scores as cpp_scores

    tol = LOW_RTOL if dtype == torch.bfloat16 else (1e-10 if dtype == torch.float64 else 1e-5)
    for seed, (M, B, D) in enumerate([(5, 300, 33), (3, 1, 7), (4, 64, 16)]):
        present = make_present(case_rng("cpp-scores", seed), M, B, "random" if B > 1 else "all")
        e = make_embeddings(torch_gen(1900 + seed), present, D, fill="nan")
        if seed == 2:
            e[0, 0] = 1e-14 * e[0, 0].nan_to_num(0.0)   # a present row below the clamp
            present[0, 0] = True
        e_lib = e.to(dtype).requires_grad_()
        S, Sp, act = cpp_scores(e_lib, present, mode)
        e_ref = ref_leaf(e.to(dtype))
        S_r, Sp_r, act_r = ref_scores(e_ref, present, mode)
        assert torch.equal(act, act_r)
        assert S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_value_close(S, S_r, tol, tol, "S")
        assert_value_close(Sp, Sp_r, tol, tol, "S_prime")
        gen = torch_gen(7)
        GS, GP = torch.randn(S_r.shape, generator=gen, dtype=torch.float64), \
            torch.randn(Sp_r.shape, generator=gen, dtype=torch.float64)
        (g_ref,) = torch.autograd.grad((S_r * GS).sum() + (Sp_r * GP).sum(), [e_ref])
        (g,) = torch.autograd.grad((S * GS.to(S)).sum() + (Sp * GP.to(Sp)).sum(), [e_lib])
        assert g.dtype == dtype
        assert_grad_close(g, g_ref, max(tol, 1e-4) if dtype == torch.float32 else tol, name="d embeddings")
        assert_rows_zero_grad(g, present)
