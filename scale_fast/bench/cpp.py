"""backend="cpp" (compiled CPU kernels) against backend="torch": the SCALE contrastive loss and the
linear cross-entropy at one size each, float32, one intra-op thread by default (both backends get
the same threads), the torch backend as the baseline of the ratios."""
from __future__ import annotations

IMPLS = ("scale_fast torch", "scale_fast cpp")
BASELINE = "scale_fast torch"
# op -> (size of the table, size of --quick); the CPU tier: D=256 / K=21128, H=768
CASES = {"contrastive_ntxent_m5": (4096, 256), "linear_ce": (8192, 256)}


def cases(quick: bool):
    """[(op name, tier, [size])] of the comparison."""
    return [(name, "quick" if quick else "cpu", [sizes[1] if quick else sizes[0]]) for name, sizes in CASES.items()]
