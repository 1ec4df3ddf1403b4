"""JIT build of the compiled CPU kernels (csrc/*.cpp).

The extension is built with ``torch.utils.cpp_extension.load`` (ninja + pybind11) the first
time it is needed -- never at ``import scale_fast`` -- and cached on disk:

- ``$TORCH_EXTENSIONS_DIR/<name>`` when TORCH_EXTENSIONS_DIR is set (torch's own variable),
- else ``$XDG_CACHE_HOME/scale_fast/torch_extensions/<python>-<torch>/<name>``
  (``~/.cache/...`` by default).

A later process only loads the cached library (ninja sees nothing to do: well under a
second).  Anything that goes wrong (no compiler, no ninja, a compile error, a source tree
without csrc/) makes the backend unavailable: ONE RuntimeWarning says why, the reason is
kept for ``unavailable_reason()``, and "auto" keeps using the torch backend.

Environment:
- ``SCALE_FAST_DISABLE_CPP=1``: never build (the backend reports itself unavailable, no warning);
- ``SCALE_FAST_CPP_VERBOSE=1``: show the compiler's output;
- ``SCALE_FAST_CPP_NO_SIMD=1``: build the portable (no AVX2) kernels.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

_SOURCE_NAMES = ("contrastive.cpp", "linear_ce.cpp", "scores.cpp", "bindings.cpp")  # + csrc/common.h
_STALE_LOCK_S = 900  # a build lock older than this was left by a killed build: remove it
log = logging.getLogger("scale_fast.backends.cpp")
_lock = threading.RLock()
_state: dict = {"tried": False, "ext": None, "reason": None, "warned": False}


def source_paths() -> list[Path]:
    """The translation units in csrc/, shipped inside this package (also in a wheel)."""
    return [Path(__file__).resolve().parent / "csrc" / name for name in _SOURCE_NAMES]


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


def build_settings() -> dict:
    """Name, flags and build directory of the extension on this machine."""
    import torch

    simd = _use_simd()
    name = "scale_fast_cpu_" + ("avx2" if simd else "generic")
    cflags = ["-O3", "-DNDEBUG", "-fopenmp"]
    cflags += ["-mavx2", "-mfma"] if simd else ["-DSF_NO_SIMD"]
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        build_dir = None  # torch's default: $TORCH_EXTENSIONS_DIR/<py, cuda tag>/<name>
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}"
        build_dir = cache / "scale_fast" / "torch_extensions" / tag / name
    return {"name": name, "extra_cflags": cflags, "extra_ldflags": ["-fopenmp"], "build_directory": build_dir}


def _compile() -> ModuleType:
    """Build (or load the cached build of) the extension; raises on any failure."""
    from torch.utils import cpp_extension

    srcs = source_paths()
    for src in srcs:
        if not src.is_file():
            raise RuntimeError(f"C++ source {src} not found (the package was installed without its csrc/ data)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not available (pip install ninja)")
    settings = build_settings()
    build_dir = settings.pop("build_directory")
    if build_dir is not None:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"
        try:  # torch waits forever on the lock file of a build that was killed
            if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
                lock.unlink()
        except OSError:
            pass
        build_dir = str(build_dir)
    log.info("scale_fast: building (or loading the cached build of) the C++ extension %s (first build: ~1 min)",
             settings["name"])
    return cpp_extension.load(sources=[str(s) for s in srcs], build_directory=build_dir, verbose=_truthy("SCALE_FAST_CPP_VERBOSE"),
                              **settings)


def _short(exc: BaseException) -> str:
    """The exception in one line (of a compiler log: its first line and first error)."""
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


def reason() -> str:
    return _state["reason"] or ("not built yet" if not _state["tried"] else "available")


def reset() -> None:
    """Forget the build attempt (tests)."""
    with _lock:
        _state.update(tried=False, ext=None, reason=None, warned=False)
