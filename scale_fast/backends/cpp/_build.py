"""JIT build of the compiled CPU kernels (csrc/*.cpp).

The extension is built with ``torch.utils.cpp_extension.load`` (ninja + pybind11) the first
time it is needed -- never at ``import scale_fast``, nor by ``available_backends()`` or
``explain_backend()`` -- into a cache directory named after everything the compiler is given,
so two checkouts, two versions or two virtual environments never rebuild each other's library:

    <cache>/scale_fast_cpu_<avx2|generic>_<key>/
    <cache> = $TORCH_EXTENSIONS_DIR (torch's own variable), else
              $XDG_CACHE_HOME/scale_fast/torch_extensions (~/.cache/... by default)
    <key>   = a hash of every file under csrc/, the compiler (its resolved path) and its flags,
              Python (version and include path) and torch (version, build id and the include and
              library paths of its install, which differ between two venvs with the same torch)
    (the sources are compiled from a copy in that directory: one build serves every checkout
    or wheel install holding the same sources)

A build (no library in that directory yet) says so in one line on stderr, then runs the
compiler in a child process (``python -m scale_fast.backends.cpp --build``) in its own process
group: if this process is interrupted the group is killed, compiler included, and if this
process dies the child kills its group itself.  A library found in its directory is imported
as it is, without asking ninja: the key names everything its build depended on, so nothing
rebuilds it silently.  ``scale-fast build-ext`` builds ahead of time (e.g. in a container image).

Builders of one directory take turns on ``owner.lock``: an flock that the kernel releases when
its owner dies, holding the owner's PID (a waiting process says once whose build it waits
for).  Under that lock torch's own lock file, which a killed build leaves behind and torch
would wait on forever, is removed.

Anything that goes wrong (no compiler, no ninja, a compile error, a source tree without
csrc/) makes the backend unavailable: ONE RuntimeWarning says why, the reason is kept for
``unavailable_reason()``, and "auto" keeps using the torch backend.

Environment:
- ``SCALE_FAST_DISABLE_CPP=1``: never build (the backend reports itself unavailable, no warning);
- ``SCALE_FAST_CPP_VERBOSE=1``: show the compiler's output;
- ``SCALE_FAST_CPP_NO_SIMD=1``: build the portable (no AVX2) kernels.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, List, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: torch's own lock only
    fcntl = None

FIRST_BUILD_TIME = "about a minute on 2 cores"  # measured: 47 s on a shared 2-core EPYC
NOT_BUILT = "compiled backend not built yet: builds on first use (~1 min) or with `scale-fast build-ext`"
_lock = threading.RLock()
_state: dict = {"tried": False, "ext": None, "reason": None, "warned": False}


def csrc_dir() -> Path:
    """csrc/, shipped inside this package (also in a wheel)."""
    return Path(__file__).resolve().parent / "csrc"


def source_paths() -> List[Path]:
    """The translation units: every csrc/*.cpp."""
    return sorted(csrc_dir().glob("*.cpp"))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _use_simd() -> bool:
    if _truthy("SCALE_FAST_CPP_NO_SIMD"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - old torch: read the CPU flags
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            return False
        return " avx2 " in flags and " fma " in flags
    return cap in ("AVX2", "AVX512")


def _cache_root() -> Path:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scale_fast" / "torch_extensions"


def _compiler() -> str:
    """The C++ compiler torch's build runs ($CXX, else c++), resolved to its file where it is on PATH."""
    cxx = os.environ.get("CXX", "c++")
    found = shutil.which(cxx)
    return os.path.realpath(found) if found else cxx


def toolchain() -> List[str]:
    """What the compile and link commands hold besides the sources and our flags: the compiler, Python
    and torch, with the include and library paths of this install (another venv has others)."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    python_include = sysconfig.get_path("include", scheme="nt" if os.name == "nt" else "posix_prefix")
    return [_compiler(), sys.version, str(python_include), torch.__version__, str(torch.version.git_version),
            *cpp_extension.include_paths("cpu"), cpp_extension.TORCH_LIB_PATH]


def cache_key(flags: List[str]) -> str:
    """12 hex digits of a hash of every file under csrc/ (path and bytes), the flags and the toolchain."""
    h = hashlib.sha256()
    root = csrc_dir()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join([*flags, *toolchain()]).encode())
    return h.hexdigest()[:12]


def build_settings() -> dict:
    """Name, flags and build directory of the extension on this machine."""
    simd = _use_simd()
    cflags = ["-O3", "-DNDEBUG", "-fopenmp"] + (["-mavx2", "-mfma"] if simd else ["-DSF_NO_SIMD"])
    ldflags = ["-fopenmp"]
    name = f"scale_fast_cpu_{'avx2' if simd else 'generic'}_{cache_key(cflags + ldflags)}"
    return {"name": name, "extra_cflags": cflags, "extra_ldflags": ldflags, "build_directory": _cache_root() / name}


def library_path(settings: dict) -> Path:
    """Where the built library of `settings` lies (present once it was built)."""
    return settings["build_directory"] / (settings["name"] + (".pyd" if os.name == "nt" else ".so"))


class BuildLock:
    """The lock of one build directory: an flock on <dir>/owner.lock, which holds the owner's PID.

    The kernel drops an flock when its process dies, so the next builder takes over a lock left
    by a killed build at once instead of waiting on it.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / "owner.lock"
        self._fd: Optional[int] = None

    def owner(self) -> Optional[int]:
        """The PID written by the last process that took the lock (None if unreadable)."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def acquire(self, on_wait: Optional[Callable[[Optional[int]], None]] = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if on_wait is not None:
                        on_wait(self.owner())
                    fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "BuildLock":
        self.acquire(on_wait=_say_waiting)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _say_waiting(pid: Optional[int]) -> None:
    who = f"process {pid}" if pid else "another process"
    print(f"scale_fast: waiting for {who} to finish building the C++ CPU kernels", file=sys.stderr, flush=True)


def _check_tools() -> None:
    """Raise RuntimeError naming what is missing to build at all."""
    from torch.utils import cpp_extension

    if not source_paths():
        raise RuntimeError(f"no C++ sources in {csrc_dir()} (the package was installed without its csrc/ data)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not available (pip install ninja)")


def _copy_sources(build_dir: Path) -> List[Path]:
    """csrc/ copied once into <build_dir>/src (the key says the content is the same), so that every
    checkout, venv or wheel install with these sources compiles the same paths: ninja then finds the
    library up to date instead of rebuilding it for each source location."""
    root, dest = csrc_dir(), build_dir / "src"
    for path in (p for p in root.rglob("*") if p.is_file()):
        target = dest / path.relative_to(root)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return [dest / p.relative_to(root) for p in source_paths()]


def _import_library(settings: dict) -> ModuleType:
    """Import the built library as it is (ninja is not asked: its folder's key says it is up to date)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(settings["name"], library_path(settings))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(settings: dict) -> ModuleType:
    """Import the extension in this process, building it first where its library is missing, holding the
    directory's lock (a library being linked by another process is imported once that build is done)."""
    from torch.utils import cpp_extension

    build_dir = settings["build_directory"]
    with BuildLock(build_dir):
        (build_dir / "lock").unlink(missing_ok=True)  # torch's lock: only a killed build leaves it now
        if library_path(settings).is_file():
            try:
                return _import_library(settings)
            except ImportError as exc:  # left half-written by a killed build: ninja relinks it
                print(f"scale_fast: rebuilding the C++ CPU kernels in {build_dir}: the library does not load "
                      f"({_short(exc)})", file=sys.stderr, flush=True)
        sources = _copy_sources(build_dir)
        return cpp_extension.load(sources=[str(s) for s in sources], build_directory=str(build_dir),
                                  verbose=_truthy("SCALE_FAST_CPP_VERBOSE"),
                                  **{k: v for k, v in settings.items() if k != "build_directory"})


class BuildFailed(RuntimeError):
    """The build child failed; the message is its one-line reason."""


def _builder_command() -> List[str]:
    return [sys.executable, "-m", "scale_fast.backends.cpp", "--build", "--child"]


def _build_in_child(settings: dict) -> None:
    """Run the compiler in a child process group; kill the whole group if this process is interrupted."""
    package_root = str(Path(__file__).resolve().parents[3])  # the folder holding scale_fast/
    env = {**os.environ, "SCALE_FAST_CPP_PARENT": str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    verbose = _truthy("SCALE_FAST_CPP_VERBOSE")
    proc = subprocess.Popen(_builder_command(), env=env, start_new_session=True, text=True,
                            stdout=None if verbose else subprocess.PIPE)
    try:
        out, _ = proc.communicate()
    except BaseException:
        kill_group(proc)
        raise
    if proc.returncode != 0:
        lines = (out or "").strip().splitlines()
        raise BuildFailed(lines[-1] if lines else f"the build process exited with status {proc.returncode}")


def kill_group(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """End a child that leads its own process group, and everything it started (SIGTERM, then SIGKILL)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)  # the group outlives its leader while the compiler runs
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def run_as_child() -> None:
    """Set-up of the build child: die with its parent, and take its process group (the compiler) along."""
    def end_group(signum, frame):
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, end_group)
    signal.signal(signal.SIGHUP, end_group)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = os.environ.get("SCALE_FAST_CPP_PARENT")
    if parent and os.getppid() != int(parent):  # the parent died before prctl took effect
        end_group(signal.SIGTERM, None)


def _compile() -> ModuleType:
    """Build (in a child process, where its folder holds no library) and load the extension; raises on any failure."""
    _check_tools()
    settings = build_settings()
    if not library_path(settings).is_file():
        print(f"scale_fast: compiling the C++ CPU kernels (backend='cpp'), once for this version and environment: "
              f"{FIRST_BUILD_TIME}, cached in {settings['build_directory']}", file=sys.stderr, flush=True)
        _build_in_child(settings)
    return _load(settings)


def build_here() -> Path:
    """Build (or find built) the extension in this process (the build child); returns the library's path."""
    _check_tools()
    settings = build_settings()
    _load(settings)
    return library_path(settings)


def prebuild() -> Path:
    """Build the extension now if it is not built (`scale-fast build-ext`); returns the library's path."""
    _compile()
    return library_path(build_settings())


def _short(exc: BaseException) -> str:
    """The exception in one line (of a compiler log: its first line and first error)."""
    if isinstance(exc, BuildFailed):
        return str(exc)
    text = str(exc).strip().splitlines()
    head = text[0] if text else ""
    if head.startswith("Error building extension"):  # "...'name': [1/2] c++ <the whole command line>"
        head = head.split(": [", 1)[0]
    if len(head) > 200:
        head = head[:200].rsplit(" ", 1)[0] + " ..."
    errors = [line.strip() for line in text[1:] if "error" in line.lower()]
    if errors:
        head += " | " + errors[0]
    if len(head) > 300:
        head = head[:300] + "..."
    return f"{type(exc).__name__}: {head}"


def extension() -> ModuleType | None:
    """The compiled module, building it on first use; None (after one warning) when it cannot be built."""
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if _state["tried"]:
            return _state["ext"]
        if _truthy("SCALE_FAST_DISABLE_CPP"):
            _state["reason"] = "disabled by SCALE_FAST_DISABLE_CPP"
        else:
            try:
                _state["ext"] = _compile()
            except Exception as exc:  # noqa: BLE001 - any failure degrades to the torch backend
                _state["reason"] = f"could not build the C++ extension ({_short(exc)})"
                if not _state["warned"]:
                    _state["warned"] = True
                    warnings.warn(
                        f"scale_fast: the compiled CPU backend (backend='cpp') is unavailable: {_state['reason']}. "
                        "backend='auto' uses the torch backend instead (set SCALE_FAST_CPP_VERBOSE=1 to see the "
                        "compiler output, SCALE_FAST_DISABLE_CPP=1 to skip the build).",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        _state["tried"] = True
        return _state["ext"]


def loaded() -> ModuleType:
    """The compiled module for the backend's ops (the dispatcher routes to them only once it is built)."""
    ext = extension()
    if ext is None:  # pragma: no cover - the dispatcher only routes here when built
        raise RuntimeError(f"backend='cpp' is not available: {reason()}")
    return ext


def pending() -> str:
    """Why the backend is not ready without a build (NOT_BUILT, or what would stop the build); "" when
    it is loaded, its library is built, or the build was tried.  Never compiles."""
    if _state["tried"] or _truthy("SCALE_FAST_DISABLE_CPP"):
        return ""
    try:
        _check_tools()
        built = library_path(build_settings()).is_file()
    except Exception as exc:  # noqa: BLE001 - the build would fail the same way: say why now
        return f"could not build the C++ extension ({_short(exc)})"
    return "" if built else NOT_BUILT


def reason() -> str:
    return _state["reason"] or ("not built yet" if not _state["tried"] else "available")


def reset() -> None:
    """Forget the build attempt (tests)."""
    with _lock:
        _state.update(tried=False, ext=None, reason=None, warned=False)
