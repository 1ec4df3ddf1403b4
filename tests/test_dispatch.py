"""The backend records and the dispatcher: who runs what, the fallbacks, and the one-line explanation."""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import scale_fast as sf
from conftest import BACKENDS, DEVICE, assert_grad_close, assert_value_close, ref_leaf, torch_gen
from reference import ref_scores
from scale_fast import _dispatch
from scale_fast.backends._capability import Capability

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTRACT_OPS = {"scores", "contrastive", "siglip", "info_nce", "info_nce_rows", "linear_cross_entropy"}


@pytest.mark.parametrize("name", sf.backend_names())
def test_every_backend_declares_a_record(name):
    record = _dispatch.capability(name)
    assert isinstance(record, Capability) and record.name == name
    assert set(record.ops) <= CONTRACT_OPS and set(record.row_range_ops) <= set(record.ops)
    assert set(record.max_modalities) <= set(record.ops)
    assert record.devices and all(d.is_floating_point for d in record.dtypes)
    if name in sf.available_backends():
        module = _dispatch._ops_module(name)
        for op in record.ops:
            assert callable(getattr(module, op)), f"{name} declares {op} but its module lacks it"


def test_torch_is_the_universal_fallback():
    record = _dispatch.capability("torch")
    assert set(record.ops) == CONTRACT_OPS and torch.float64 in record.dtypes and "*" in record.devices
    assert "torch" in sf.available_backends()


def test_available_backends_with_reasons():
    reasons = sf.available_backends(with_reasons=True)
    assert tuple(reasons) == sf.backend_names() == ("torch", "triton", "cpp")
    assert reasons["torch"] == ""
    assert sf.available_backends() == [name for name, why in reasons.items() if not why]
    for name, why in reasons.items():
        assert isinstance(why, str)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_triton_unavailable_without_cuda_or_interpreter():
    code = ("import scale_fast as sf\n"
            "r = sf.available_backends(with_reasons=True)\n"
            "print(repr(r['triton']))\n"
            "assert 'triton' not in sf.available_backends()\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["SCALE_FAST_DISABLE_CPP"] = "1"  # no build in the child
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "CUDA" in out.stdout or "triton does not import" in out.stdout


def _fn_backend(fn) -> str:
    return fn.__module__.split(".")[2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_op_follows_the_record(backend):
    """Where the record declares the inputs the backend's own op runs; anything else goes to torch."""
    record = _dispatch.capability(backend)
    dev = torch.device(DEVICE)
    e32 = torch.zeros(3, 2, 4, device=dev)
    e64 = e32.double()
    for op in ("scores", "contrastive"):
        assert _fn_backend(_dispatch.get_op(backend, op, e32)) == backend
        want64 = backend if torch.float64 in record.dtypes else "torch"
        assert _fn_backend(_dispatch.get_op(backend, op, e64)) == want64
    big = torch.zeros(17, 2, 4, device=dev)
    assert _fn_backend(_dispatch.get_op(backend, "scores", big)) == (
        "torch" if record.max_modalities.get("scores", 99) < 17 else backend)
    want_rows = backend if "contrastive" in record.row_range_ops else "torch"
    assert _fn_backend(_dispatch.get_op(backend, "contrastive", e32, row_range=True)) == want_rows
    a = torch.zeros(3, 4, device=dev)
    want_nce_rows = backend if "info_nce_rows" in record.ops else "torch"
    assert _fn_backend(_dispatch.get_op(backend, "info_nce_rows", a, a)) == want_nce_rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_fallback_for_large_m_is_exact(backend):
    """M above a backend's declared largest M runs the torch backend: still the reference values."""
    M, B, D = 17, 3, 5
    gen = torch_gen(5)
    present = torch.rand(M, B, generator=gen) < 0.7
    present[:, 0] = True
    e = torch.randn(M, B, D, generator=gen)
    e_dev = e.to(DEVICE).requires_grad_(True)
    S, Sp, _ = sf.inter_modality_scores(e_dev, present.to(DEVICE)) if backend == "auto" else \
        _dispatch.get_op(backend, "scores", e_dev)(e_dev, present.to(DEVICE), "sample")
    e_ref = ref_leaf(e)
    S_ref, Sp_ref, _ = ref_scores(e_ref, present)
    assert_value_close(S, S_ref, name="S")
    assert_value_close(Sp, Sp_ref, name="S'")
    g, = torch.autograd.grad((S * 0.3 + Sp).sum(), e_dev)
    g_ref, = torch.autograd.grad((S_ref * 0.3 + Sp_ref).sum(), e_ref)
    assert_grad_close(g, g_ref)


def test_explain_backend_one_line():
    e = torch.randn(3, 4, 5)
    line = sf.explain_backend("contrastive", e)
    want = "cpp" if "cpp" in sf.available_backends() else "torch"
    assert "\n" not in line and line.startswith("contrastive[cpu, float32, M=3] -> ")
    assert f"-> {want}: backend='auto'" in line
    line = sf.explain_backend("contrastive", e.double(), backend="torch")
    assert line == "contrastive[cpu, float64, M=3] -> torch: backend='torch' requested"
    assert "backend must be one of" in sf.explain_backend("scores", e, backend="nope")
    with pytest.raises(TypeError, match="input tensors"):
        sf.explain_backend("scores")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton does not run here")
def test_explain_backend_names_the_fallback():
    e = torch.randn(20, 4, 5, device=DEVICE)
    assert sf.explain_backend("scores", e, backend="triton").endswith(
        "but triton scores handles M <= 16, got M=20, so torch runs it")
    assert "triton has no float64 kernels, so torch runs it" in sf.explain_backend(
        "contrastive", e[:3].double(), backend="triton")
    assert "so torch runs it" not in sf.explain_backend("contrastive", e[:3], backend="triton", row_range=True)


def test_explicit_backend_that_cannot_run_is_an_error():
    reasons = sf.available_backends(with_reasons=True)
    for name, why in reasons.items():
        if why:
            with pytest.raises(ValueError, match=f"backend='{name}' is not available"):
                sf.multi_pair_info_nce(torch.randn(2, 3, 4), backend=name)
    if "cpp" in sf.available_backends() and torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cpp' runs on cpu tensors only"):
            sf.multi_pair_info_nce(torch.randn(2, 3, 4, device="cuda"), backend="cpp")


def test_device_notes_come_from_the_record(monkeypatch):
    """The explicit-backend device error and the benchmarks' skip read the backend's record, not its name."""
    import dataclasses

    from scale_fast.bench.op import scale_fast_impls

    record = dataclasses.replace(_dispatch.capability("torch"), devices=("cuda",), device_hint="a hint",
                                 measured_on=("cuda",), unmeasured_reason="not timed here")
    monkeypatch.setitem(_dispatch._records, "torch", record)
    with pytest.raises(ValueError, match=r"backend='torch' runs on cuda tensors only; got tensors on cpu \(a hint\)"):
        _dispatch.resolve_backend("torch", torch.device("cpu"))
    (impl,) = scale_fast_impls("cpu", lambda be: None, backends=["torch"])
    assert impl.skip == "not timed here"


def test_names_come_from_the_registry():
    import argparse

    from scale_fast.cli import _add_pretrain_args

    parser = argparse.ArgumentParser()
    _add_pretrain_args(parser)
    action = next(a for a in parser._actions if "--backend" in a.option_strings)
    assert tuple(action.choices) == ("auto",) + sf.backend_names()


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_no_backend_imports_another_backend_or_the_dispatcher():
    backends = ROOT / "scale_fast" / "backends"
    for name in sf.backend_names():
        others = set(sf.backend_names()) - {name}
        for path in (backends / name).glob("*.py"):
            for mod in _imports(path):
                parts = mod.lstrip(".").split(".")
                assert "_dispatch" not in parts, f"{path.name} of {name} imports the dispatcher"
                if mod.startswith(".."):  # relative to scale_fast/backends
                    assert parts[0] not in others, f"{path} imports backend {parts[0]}"
                assert not (mod.startswith("scale_fast.backends.") and parts[2] in others), f"{path} imports {mod}"
