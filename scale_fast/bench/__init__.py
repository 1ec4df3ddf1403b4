"""The benchmarks of scale_fast: this library's backends against naive PyTorch and installed peers.

One system, used by `scale-fast bench` and by the scripts of benchmarks/:

- ``op.py``       what an op declares (sizes, inputs, implementations, reference);
- ``contrastive.py``, ``linear_ce.py``, ``jct.py``, ``scale_step.py``  one module per op,
  ``cpp.py`` the backend="cpp" vs backend="torch" comparison;
- ``naive.py``    the naive materialized PyTorch baselines (and the chunked reference);
- ``measure.py``  agreement, time (warm-up, CUDA sync, L2 flush) and peak memory;
- ``runner.py``   one op's implementations over its sizes, records per row;
- ``report.py``   header (machine, versions, date, command, threads, load), tables, CSV, plots;
- ``command.py``  `scale-fast bench` and ``tables()``, the engine the scripts share.
- ``pretrain_memory.py``  the largest batch `scale-fast pretrain` fits in a peak-RSS budget, with
  and without ``--micro-batch`` (fresh processes), and the cached step's cost per sample.

Peers (OpenCLIP, Inf-CL, Liger-Kernel, Cut Cross-Entropy, xformers, torch's
F.linear_cross_entropy) are optional: one that is missing is listed as skipped with the reason.
"""
from .command import add_arguments, main, run, set_threads, tables, write
from .op import Impl, Op
from .runner import all_ops, run_op

__all__ = ["add_arguments", "main", "run", "set_threads", "tables", "write", "Impl", "Op", "all_ops", "run_op"]
