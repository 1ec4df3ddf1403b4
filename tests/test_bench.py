"""`scale-fast bench`: the command's code path at tiny sizes writes the table, the CSV and the plots."""
import csv
import importlib.util

import pytest

from scale_fast import bench, cli


def test_bench_command_writes_table_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--quick", "--ops", "contrastive_clip_m2,linear_ce", "--sizes", "32,64", "--reps", "1",
                   "--threads", "1", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "## contrastive_clip_m2" in stdout and "## linear_ce" in stdout
    assert "| B | impl | time ms | peak MiB |" in stdout
    # a peer that is not installed is listed with the reason, not hidden
    if importlib.util.find_spec("open_clip") is None:
        assert "OpenCLIP ClipLoss: skipped: not installed" in stdout
    assert "Liger fused_linear_cross_entropy: skipped" in stdout
    md = (out / "bench.md").read_text()
    assert "machine:" in md and "versions:" in md and "command: `scale-fast bench --quick" in md
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == {"contrastive_clip_m2", "linear_ce"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"scale_fast torch", "naive torch"}
    for r in ok:   # checked against the float64 reference before timing
        assert float(r["time ms"]) > 0 and float(r["loss rel err"]) < 1e-4 and float(r["grad rel err"]) < 1e-3
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
    ops = bench.all_ops()
    op = ops["contrastive_ntxent_m2"]
    wrong = bench.Impl("wrong", "peer", lambda inp: (lambda: 2.0 * inp["emb"].sum()))
    op.impls = lambda device: [wrong]
    (rec,) = bench.run_op(op, "cpu", "quick", [16], reps=1, warmup=0, log=lambda s: None)
    assert rec["status"] == "MISMATCH" and "time ms" not in rec
