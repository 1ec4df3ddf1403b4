"""The benchmark system (scale_fast/bench/) at tiny sizes: `scale-fast bench` writes the table, the
CSV and the plots; a disagreeing implementation is not timed; the scripts of benchmarks/ run."""
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_grad_close, assert_value_close, torch_gen
from reference import ref_scale_loss

from scale_fast import bench, cli
from scale_fast.bench import naive
from scale_fast.bench.contrastive import import_open_clip_loss

ROOT = Path(__file__).resolve().parents[1]


def test_bench_command_writes_table_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--quick", "--ops", "contrastive_clip_m2,linear_ce", "--sizes", "32,64", "--reps", "1",
                   "--threads", "1", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "## contrastive_clip_m2" in stdout and "## linear_ce" in stdout
    assert "| B | impl | time ms | CPU ms | × base | peak MiB |" in stdout
    # a peer that is not installed is listed with the reason, not hidden
    if importlib.util.find_spec("open_clip") is None:
        assert "OpenCLIP ClipLoss: skipped: not installed" in stdout
    assert "Liger fused_linear_cross_entropy: skipped" in stdout
    md = (out / "bench.md").read_text()
    assert "machine:" in md and "versions:" in md and "command: `scale-fast bench --quick" in md
    assert "torch 1 thread," in md and "load average" in md
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == {"contrastive_clip_m2", "linear_ce"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"scale_fast torch", "naive torch"}
    for r in ok:   # checked against the float64 reference before timing
        assert float(r["time ms"]) > 0 and float(r["loss rel err"]) < 1e-4 and float(r["grad rel err"]) < 1e-3
    naive = [r for r in ok if r["kind"] == "naive"]
    assert naive and all(float(r["x base"]) == 1.0 for r in naive)
    assert all(r["info_torch"] and r["info_date_utc"] for r in rows)
    if importlib.util.find_spec("matplotlib") is not None:
        for op in ("contrastive_clip_m2", "linear_ce"):
            png = out / f"bench_{op}.png"
            assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert png.stat().st_size < 200_000
    else:
        assert "matplotlib is not installed" in md


def test_bench_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench.main(["--ops", "nope"])


def test_bench_mismatch_is_not_timed():
    op = bench.all_ops()["contrastive_ntxent_m2"]
    op.impls = lambda device: [bench.Impl("wrong", "peer", lambda inp: (lambda: 2.0 * inp["emb"].sum()))]
    (rec,) = bench.run_op(op, "cpu", "quick", [16], reps=1, warmup=0, log=lambda s: None)
    assert rec["status"] == "MISMATCH" and "time ms" not in rec


@pytest.mark.parametrize("M", [2, 5])
def test_siglip_rows_agree_with_the_reference(M):
    """The siglip ops at a quick size: every row that runs agrees with the float64 reference; OpenCLIP's
    SigLipLoss (M=2) runs when open_clip's loss module imports, else it is listed with the reason."""
    op = bench.all_ops()[f"contrastive_siglip_m{M}"]
    rows = bench.run_op(op, "cpu", "quick", [96], reps=1, warmup=0, timed=False, log=lambda s: None)
    by = {r["impl"]: r for r in rows}
    assert by["scale_fast torch"]["status"] == by["naive torch"]["status"] == "ok"
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":   # float32 rows against the float64 reference
            assert r["loss rel err"] < 1e-5 and r["grad rel err"] < 1e-4, r
        else:
            assert r["reason"]
    peers = {name: r for name, r in by.items() if r["kind"] == "peer"}
    assert list(peers) == (["OpenCLIP SigLipLoss"] if M == 2 else [])
    if M == 2:
        try:
            import_open_clip_loss("SigLipLoss")
        except ImportError as exc:
            assert peers["OpenCLIP SigLipLoss"]["reason"] == str(exc)
        else:
            assert peers["OpenCLIP SigLipLoss"]["status"] == "ok"


@pytest.mark.parametrize("M", [2, 5])
def test_naive_siglip_equals_the_reference(M):
    """The naive baseline, and the row-chunked reference of the sizes where it does not fit, against
    tests/reference.py in float64: loss and embedding gradient (M=5: S' weights, absent samples)."""
    gen = torch_gen(70 + M)
    B, D, s, b, harmonize = 41, 12, 10.0, -10.0, M > 2
    present = torch.rand(M, B, generator=gen) < (0.6 if harmonize else 2.0)
    present[0] |= ~present.any(0)
    e = torch.randn(M, B, D, generator=gen, dtype=torch.float64)
    e_ref = e.clone().requires_grad_()
    ref = ref_scale_loss(e_ref, present, s, form="siglip", logit_bias=b, harmonize=harmonize)["total"]
    (g_ref,) = torch.autograd.grad(ref, e_ref)

    def materialized(x):
        w = naive.scores_sample(naive.normalize(x, present), present) if harmonize else None
        return naive.contrastive(x, present, form="siglip", weights=w, logit_scale=s, logit_bias=b)

    def chunked(x):   # 16-row chunks: three per pair
        return naive.contrastive_chunked(x, present, form="siglip", harmonize=harmonize, logit_scale=s, logit_bias=b,
                                         chunk_rows=16)
    for fn in (materialized, chunked):
        x = e.clone().requires_grad_()
        out = fn(x)
        (g,) = torch.autograd.grad(out, x)
        assert_value_close(out, ref, 1e-12, 1e-12, fn.__name__)
        assert_grad_close(g, g_ref, 1e-10, name=f"d embeddings ({fn.__name__})")


def test_fresh_process_peak_measures_one_call():
    op = bench.all_ops()["linear_ce"]
    rows = bench.run_op(op, "cpu", "quick", [64], reps=1, warmup=0, impl_filter={"naive"}, fresh_peak=True,
                        timed=False, log=lambda s: None)
    (row,) = [r for r in rows if r["status"] == "ok"]
    # one call holds at least the [N, K] float32 logits; the fresh process sees them too
    assert row["peak MiB"] >= 64 * 4096 * 4 / 2 ** 20 and row["peak RSS MiB"] >= 64 * 4096 * 4 / 2 ** 20
    assert "time ms" not in row


def test_plot_keeps_identical_series_and_zero(tmp_path):
    """Two identical series get different markers; a measured 0 MiB is drawn at 0, not at a floor."""
    pytest.importorskip("matplotlib")
    from scale_fast.bench import report

    op = bench.all_ops()["linear_ce"]
    recs = [{"op": "linear_ce", "x": x, "impl": name, "kind": kind, "status": "ok", "time ms": 1.0 + x,
             "peak MiB": 0.0 if name == "b" else 2.0} for x in (1, 2) for name, kind in (("a", "naive"), ("b", "peer"),
                                                                                          ("c", "peer"))]
    recs += [dict(r, impl="c2") for r in recs if r["impl"] == "c"]
    info = {"cpu_cores": 2, "torch_threads": 1, "torch": "x"}
    import matplotlib.pyplot as plt

    saved = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, path, *a, **k):
        saved["fig"] = fig
        return real_savefig(fig, path, *a, **k)
    plt.Figure.savefig = capture
    try:
        assert report.plot(op, recs, tmp_path / "p.png", info)
    finally:
        plt.Figure.savefig = real_savefig
    time_ax, mem_ax = saved["fig"].axes
    lines = mem_ax.get_lines()
    assert len({ln.get_marker() for ln in lines}) == len(lines) == 4
    b = next(ln for ln in lines if ln.get_label() == "b")
    assert list(b.get_ydata()) == [0.0, 0.0] and mem_ax.get_ylim()[0] == 0
    assert "1 thread," in saved["fig"]._suptitle.get_text()


def test_script_runs(tmp_path):
    """A thin script of benchmarks/ over the package (the others share its _script.py)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_linear_ce.py"), "--dry-run", "--threads",
                           "1", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "linear_ce_cpu_dryrun.md").read_text()
    assert "| ok |" in md and "command: `python benchmarks/bench_linear_ce.py --dry-run" in md
    assert (tmp_path / "linear_ce_cpu_dryrun.csv").exists()


def test_script_other_shape(tmp_path, monkeypatch, capsys):
    """--vocab/--hidden build the op at that K and H (its own table name); a bad value is one line, exit 2."""
    script = str(ROOT / "benchmarks" / "bench_linear_ce.py")
    proc = subprocess.run([sys.executable, script, "--dry-run", "--threads", "1", "--vocab", "3001", "--hidden", "24",
                           "--rows", "512", "--only", "scale_fast torch", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "linear_ce_k3001_h24_cpu_dryrun.md").read_text()
    assert "## linear_ce_k3001_h24:" in md and "K=3001, H=24" in md
    assert "| 256 | scale_fast torch |" in md and "| ok |" in md   # a dry run stays tiny
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_linear_ce

    for flag, value in (("--vocab", "0"), ("--hidden", "x"), ("--rows", "8,-1")):
        with pytest.raises(SystemExit) as stop:
            bench_linear_ce.main(["--dry-run", flag, value])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"argument {flag}:" in err and ("must be >= 1" in err or "invalid" in err), err


def test_linear_ce_chunked_reference():
    """The chunked float64 reference of the linear-CE tables equals the materialized one, values and gradients."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(37, 9, generator=gen, dtype=torch.float64)
    weight = torch.randn(53, 9, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 53, (37,), generator=gen)
    outs = []
    for fn in (lambda h, w: naive.linear_ce(h, w, target),
               lambda h, w: naive.linear_ce_chunked(h, w, target, chunk_bytes=8 * 53 * 5)):  # 5-row chunks
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        outs.append((loss, *torch.autograd.grad(loss, (h, w))))
    (ref, dh_ref, dw_ref), (out, dh, dw) = outs
    assert_value_close(out, ref, 1e-12, 1e-12, "loss")
    assert_grad_close(dh, dh_ref, 1e-10, name="d hidden")
    assert_grad_close(dw, dw_ref, 1e-10, name="d weight")


def test_largest_batch_search():
    from scale_fast.bench.pretrain_memory import largest_batch

    for limit in (1, 127, 128, 129, 700, 1000, 5000):
        tried = []

        def fits(b):
            tried.append(b)
            return b <= limit

        lo, hi = largest_batch(fits, 128, 4096)
        if limit < 128:
            assert (lo, hi) == (None, 128)
            continue
        assert lo <= limit and fits(lo) and (hi is None or hi > limit)
        assert hi is None and lo == 4096 if limit >= 4096 else hi - lo <= max(1, lo // 4)
        assert len(tried) <= 9


def test_pretrain_memory_script_runs(tmp_path):
    """benchmarks/bench_pretrain_memory.py at tiny sizes: fresh `scale-fast pretrain` processes, the table written."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_pretrain_memory.py"), "--start", "2",
                           "--cap", "2", "--reference-batch", "2", "--micro-batch", "1", "--budget-mib", "100000",
                           "--time-batch", "3", "--reps", "1", "--out-dir", str(tmp_path), "--backend", "torch", "--set", "jct_layers=1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "pretrain_memory_cpu.md").read_text()
    assert "command: `python benchmarks/bench_pretrain_memory.py --start 2" in md and "torch 1 thread," in md
    assert "| --micro-batch 1 | 0 | 2 |" in md and "| --micro-batch 1 | 3 | 2 |" in md and "| plain | 3 | 2 |" in md
    assert "| 2 | - | 0 |" in md and "| 2 | 1 | 0 |" in md  # every probe listed
    assert "| 3 | cached_step, K=1, features read again (--micro-batch) |" in md  # the timed steps
    rows = list(csv.DictReader(open(tmp_path / "pretrain_memory_cpu.csv")))
    assert len(rows) == 4 and all(int(r["peak"]) > 0 and float(r["s_per_sample"]) > 0 for r in rows)


def test_memory_script_measures_rss_and_allocation(tmp_path):
    """bench_memory_cpu.py: a fresh process per row, its peak RSS growth and peak allocation hold at
    least the embedding gradient, and the timing rows give a ratio to naive."""
    script = ROOT / "benchmarks" / "bench_memory_cpu.py"
    out = subprocess.run([sys.executable, str(script), "--sizes", "256", "--threads", "1", "--backends", "torch",
                          "--timing", "64", "--reps", "1", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "contrastive_memory_cpu.csv") as f:
        (row,) = list(csv.DictReader(f))
    grad = float(row["of which embedding gradient MiB"])
    assert grad == 5 * 256 * 256 * 4 / 2 ** 20
    assert float(row["peak RSS growth MiB"]) >= grad and float(row["peak allocated MiB"]) >= grad
    text = (tmp_path / "contrastive_memory_cpu.md").read_text()
    assert "| 256 | torch | 1 |" in text and "ratio to naive" in text


def test_contrastive_script_takes_dim_and_modalities(tmp_path):
    """bench_contrastive.py --dim/--modalities: only the M=5 rows, built at that width (the rows
    gpu_check.sh takes for the SCALE loss at D=256), each still checked against its reference."""
    script = ROOT / "benchmarks" / "bench_contrastive.py"
    out = subprocess.run([sys.executable, str(script), "--dry-run", "--dim", "40", "--modalities", "5",
                          "--batches", "32", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (md,) = tmp_path.glob("contrastive_d40_m5_*.md")
    text = md.read_text()
    assert "contrastive_ntxent_m5_d40" in text and "D=40" in text and "contrastive_clip_m2" not in text
    with open(md.with_suffix(".csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    assert rows and all(r["op"] == "contrastive_ntxent_m5_d40" for r in rows)


def test_linear_ce_side_by_side_script(tmp_path):
    """bench_linear_ce_cpu.py: both backends agree with torch's own op, and the GEMM floor is timed beside them."""
    import scale_fast as sf

    if "cpp" not in sf.available_backends() or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip("needs the cpp backend and torch's F.linear_cross_entropy")
    script = ROOT / "benchmarks" / "bench_linear_ce_cpu.py"
    out_md = tmp_path / "side_by_side.md"
    out = subprocess.run([sys.executable, str(script), "--threads", "1", "--rounds", "1", "--n", "128", "--k", "500",
                          "--h", "32", "--out", str(out_md)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out_md.read_text().splitlines() if line.startswith("| 1 |")]
    assert [r[1].strip() for r in rows] == ["scale_fast torch", "scale_fast cpp", "F.linear_cross_entropy (chunked "
                                            "options)", "the three GEMMs alone (scale_fast's chunks)",
                                            "the same FLOPs as square GEMMs (this CPU's float32 rate)"]
    for r in rows[:2]:
        assert float(r[9]) < 1e-5 and float(r[10]) < 1e-5  # loss and gradient rel diff vs the peer


def test_shapes_script(tmp_path):
    """bench_shapes_cpu.py --quick: one row per shape, both backends timed beside naive."""
    import scale_fast as sf

    if "cpp" not in sf.available_backends():
        pytest.skip("needs the cpp backend")
    out_md = tmp_path / "shapes.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_shapes_cpu.py"), "--quick", "--threads",
                           "1", "--reps", "1", "--out", str(out_md)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out_md.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r[0].split()[0] for r in rows] == ["contrastive", "scores", "linear"]
    for r in rows:
        assert all(float(v) > 0 for v in (r[1], r[2], r[4]))  # naive, torch and cpp were timed
    assert "command: `python benchmarks/bench_shapes_cpu.py --quick" in text


def test_bench_says_when_plots_are_skipped(tmp_path, monkeypatch, capsys):
    """Without matplotlib: one line on stderr naming the extra that brings the plots, and the note in bench.md."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = {"text": "table\n", "records": [{"op": "linear_ce", "impl": "x"}], "info": {}, "ops": {}}
    paths = bench.write(result, tmp_path, "bench", plots=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["scale-fast bench: matplotlib is not installed: no plots (pip install 'scale_fast[bench]')"]
    assert not [p for p in paths if p.suffix == ".png"] and "no plots" in (tmp_path / "bench.md").read_text()
