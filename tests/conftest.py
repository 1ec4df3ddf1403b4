"""Shared setup of the scale_fast test suite.

Without CUDA the Triton kernels run in interpreter mode on CPU tensors: the
variable must be set before anything imports triton, hence at the very top.
The interpreter is ~100x slower than torch, so every test draws its shapes
through ``sizes(backend, ...)`` / ``n_cases(backend, ...)``, which keep the
triton cases tiny and few while the torch cases are large and many.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

# The tests run many tiny ops (the reference loops over pairs and samples): with several intra-op
# threads on a busy 2-core machine each tiny op pays a thread-pool handoff (30x slower measured).
# SCALE_FAST_TEST_THREADS=N runs the suite with N threads instead (e.g. to exercise threaded CPU kernels).
torch.set_num_threads(int(os.environ.get("SCALE_FAST_TEST_THREADS", "1")))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"

import scale_fast as _sf  # noqa: E402
from scale_fast._dispatch import capability  # noqa: E402

# available_backends() never compiles by itself: build the compiled backend here (once per build
# folder, cached) so that the suite runs its ops; a failed build leaves it out with one warning.
_sf.available_backends(build=True)


def _runs_here(name: str) -> bool:
    """Available on this machine and declared for the test tensors' device (cpp: CPU only)."""
    devices = capability(name).devices
    return name in _sf.available_backends() and ("*" in devices or torch.device(DEVICE).type in devices)


# every backend of the registry that can run the suite's tensors here, in registry order
BACKENDS = [name for name in _sf.backend_names() if _runs_here(name)]

if DEVICE == "cuda":  # the checked path uses exact float32 dot products
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

# docs/contract.md §8 tolerances
LOSS_RTOL = 1e-5
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-4
LOW_RTOL = 2e-2


def is_slow(backend: str) -> bool:
    """True where the backend runs interpreted (triton on CPU)."""
    return backend == "triton" and INTERPRETED


def n_cases(backend: str, fast: int, slow: int) -> int:
    return slow if is_slow(backend) else fast


def backend_cases(fast: int, slow: int, backends=None):
    """pytest params (backend, seed): `fast` seeds for fast backends, `slow` for interpreted ones."""
    out = []
    for b in backends or BACKENDS:
        for seed in range(n_cases(b, fast, slow)):
            out.append(pytest.param(b, seed, id=f"{b}-{seed}"))
    return out


def backend_grid(names, combos, slow_combos=None, backends=None):
    """pytest params (backend, *combo): every combo for fast backends, `slow_combos` for interpreted ones."""
    out = []
    for b in backends or BACKENDS:
        for combo in (slow_combos if (is_slow(b) and slow_combos is not None) else combos):
            combo = combo if isinstance(combo, tuple) else (combo,)
            out.append(pytest.param(b, *combo, id="-".join([b] + [str(c) for c in combo])))
    return out


def case_rng(*key) -> random.Random:
    """A Python RNG seeded from the test's name and seed: fresh shapes/patterns per case."""
    return random.Random(_stable_hash(key))


def _stable_hash(key) -> int:
    h = 1469598103934665603
    for ch in repr(key).encode():
        h = ((h ^ ch) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFF


def torch_gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def sizes(backend: str, rng: random.Random, *, B=None, D=None):
    """(B, D): B from 1 to ~300 for torch, <= 24 for interpreted triton; D odd-ish."""
    if is_slow(backend):
        B = B if B is not None else rng.choice([1, 2, 3, 5, 8, 13, 17, 24])
        D = D if D is not None else rng.choice([7, 16, 33, 40])
    else:
        B = B if B is not None else rng.choice([1, 2, 3, 7, 16, 31, 64, 100, 129, 200, 300])
        D = D if D is not None else rng.choice([7, 16, 33, 65, 128])
    return B, D


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #
PATTERNS = ("all", "random", "absent_modality", "n1", "mixed", "sparse")


def make_present(rng: random.Random, M: int, B: int, pattern: str) -> torch.Tensor:
    """[M, B] bool present mask following a missing-modality pattern."""
    if pattern == "all":
        return torch.ones(M, B, dtype=torch.bool)
    p = rng.uniform(0.55, 0.9) if pattern != "sparse" else rng.uniform(0.2, 0.45)
    pres = torch.tensor([[rng.random() < p for _ in range(B)] for _ in range(M)], dtype=torch.bool)
    if pattern in ("absent_modality", "mixed"):
        pres[rng.randrange(M)] = False
    if pattern in ("n1", "mixed"):
        # a pair (i, j) with exactly one common sample: j keeps a single sample where i is present
        cands = [m for m in range(M) if pres[m].any()]
        i = rng.choice(cands) if cands else 0
        j = rng.choice([m for m in range(M) if m != i])
        pres[i, rng.randrange(B)] = True
        b_keep = rng.choice([b for b in range(B) if pres[i, b]])
        pres[j] = False
        pres[j, b_keep] = True
    return pres


def make_embeddings(gen: torch.Generator, present: torch.Tensor, D: int, fill: str = "nan",
                    dtype=torch.float32) -> torch.Tensor:
    """[M, B, D] random embeddings (random norms) whose absent rows hold `fill` (nan/zero/big/inf)."""
    M, B = present.shape
    e = torch.randn(M, B, D, generator=gen, dtype=torch.float64)
    e = e * torch.exp(torch.randn(M, B, 1, generator=gen, dtype=torch.float64))  # varied norms
    if fill == "nan":
        val = math.nan
    elif fill == "zero":
        val = 0.0
    elif fill == "inf":
        val = math.inf
    else:
        val = 1e30
    e = torch.where(present[..., None], e, torch.full_like(e, val))
    return e.to(dtype)


def make_aligned(gen: torch.Generator, B: int, absent=(), M: int = 5, D: int = 32) -> tuple:
    """(present [M, B], e [M, B, D] float32): the modalities of a sample nearly aligned (one shared row
    plus 0.1 x noise, random norms), as after training, so the positives are confident; absent: the
    (modality, sample) entries of present set False (their rows keep their random values)."""
    present = torch.ones(M, B, dtype=torch.bool)
    for m, b in absent:
        present[m, b] = False
    e = torch.randn(1, B, D, generator=gen, dtype=torch.float64) \
        + 0.1 * torch.randn(M, B, D, generator=gen, dtype=torch.float64)
    return present, (e * torch.exp(torch.randn(M, B, 1, generator=gen, dtype=torch.float64))).float()


def dev_leaf(x: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A leaf copy of x on DEVICE (same dtype)."""
    return x.detach().clone().to(DEVICE).requires_grad_(requires_grad and x.is_floating_point())


def ref_leaf(x: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A float64 CPU leaf copy of x (ints stay ints)."""
    x = x.detach().cpu()
    if x.is_floating_point():
        return x.double().clone().requires_grad_(requires_grad)
    return x.clone()


# --------------------------------------------------------------------------- #
# comparisons
# --------------------------------------------------------------------------- #
def _cpu64(x):
    return x.detach().cpu().double()


def assert_value_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = LOSS_RTOL, atol: float = LOSS_ATOL,
                       name: str = "value"):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = _cpu64(out), _cpu64(ref)
    assert torch.isfinite(o).all(), f"{name}: non-finite output {o}"
    nan_ok = torch.isnan(r)
    assert not nan_ok.any(), f"{name}: the reference is NaN (test bug)"
    bad = (o - r).abs() > atol + rtol * r.abs()
    if bad.any():
        diff = (o - r).abs()
        k = int(torch.argmax(torch.where(bad, diff, torch.zeros_like(diff))))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol:g} rtol={rtol:g}; "
            f"worst at flat index {k}: got {o.flatten()[k].item()!r}, reference {r.flatten()[k].item()!r}"
            f"\n got={o}\n ref={r}")


def assert_grad_close(g, gref, rtol: float = GRAD_RTOL, name: str = "grad", zero_atol: float = 1e-4):
    """||g - gref|| / ||gref|| <= rtol; where gref is exactly 0, ||g|| <= zero_atol (or g is None).

    Structural zeros (absent rows, detached paths) are checked exactly by the callers."""
    r = _cpu64(gref)
    if g is None:
        assert float(r.abs().max()) == 0.0 if r.numel() else True, f"{name}: no gradient, reference nonzero"
        return
    o = _cpu64(g)
    assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != reference {tuple(r.shape)}"
    assert torch.isfinite(o).all(), f"{name}: non-finite gradient"
    ref_norm = float(r.norm())
    err = float((o - r).norm())
    if ref_norm <= 1e-10:  # identically zero (e.g. every loss is log 1): only float rounding allowed
        assert err <= zero_atol, f"{name}: reference gradient is 0, got norm {err}"
    else:
        assert err <= rtol * ref_norm, f"{name}: relative gradient error {err / ref_norm:.3e} > {rtol}"


def assert_rows_zero_grad(g, present: torch.Tensor, name: str = "embeddings grad"):
    """docs/contract.md §2: the gradient of absent rows is exactly 0 (and nothing is NaN)."""
    if g is None:
        return
    g = g.detach().cpu()
    assert not torch.isnan(g).any(), f"{name}: NaN in gradient"
    absent = ~present.cpu()
    if absent.any():
        assert (g[absent] == 0).all(), f"{name}: nonzero gradient on absent rows"


def grads(output: torch.Tensor, inputs):
    """torch.autograd.grad that tolerates outputs without a graph and unused inputs."""
    inputs = list(inputs)
    need = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not output.requires_grad or not need:
        res = {}
    else:
        gs = torch.autograd.grad(output, need, allow_unused=True)
        res = {id(x): g for x, g in zip(need, gs)}
    return [res.get(id(x)) if isinstance(x, torch.Tensor) else None for x in inputs]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and far faster when other jobs share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- #
# process groups
# --------------------------------------------------------------------------- #
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, worker, world, init, outdir):
    """One spawned rank: one thread, a gloo group, and worker(rank, world)'s results saved for the parent."""
    import os
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(worker(rank, world), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world: int, tmp_path_factory, name: str):
    """Every rank's results of worker(rank, world) (run inside a gloo group) in `world` spawned processes."""
    import os
    import torch.multiprocessing as mp
    outdir = str(tmp_path_factory.mktemp(f"{name}{world}"))
    mp.spawn(_rank_main, args=(worker, world, f"tcp://127.0.0.1:{free_port()}", outdir), nprocs=world, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def rank_fixtures(worker, name: str):
    """Module-scoped fixtures ranks2 and ranks3: every rank's results of run_ranks(worker) in 2 and 3
    processes.  A test module binds them: ``ranks2, ranks3 = rank_fixtures(_worker, "name")``."""
    def fixture(world):
        @pytest.fixture(scope="module", name=f"ranks{world}")
        def ranks(tmp_path_factory):
            return run_ranks(worker, world, tmp_path_factory, name)
        return ranks
    return fixture(2), fixture(3)
