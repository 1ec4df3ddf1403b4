"""`scale-fast pretrain`: the loss falls, checkpoints are atomic and --resume is exact."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from scale_fast.cli import main
from scale_fast.data import DataFormatError, SyntheticProducts
from scale_fast.data.manifest import write_manifest
from scale_fast.model import SCALEConfig, SCALEModel

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--set", "hidden_size=32", "--set", "jct_hidden_size=32", "--set", "embed_dim=16"]


def run(tmp_path, name, *extra, steps=6, batch=8):
    out = tmp_path / name
    argv = ["pretrain", *(["--steps", str(steps)] if steps else []), "--batch-size", str(batch), "--eval-size", "24",
            *([] if "--eval-every" in extra else ["--eval-every", "0"]),
            "--log-every", "1", "--warmup", "2", "--no-progress", "--out", str(out),
            "--threads", "1", *SMALL, *extra]
    assert main(argv) == 0
    return out


def events(out, kind):
    return [r for r in map(json.loads, open(out / "log.jsonl")) if r["event"] == kind]


def test_resume_is_exact(tmp_path, capsys):
    full = run(tmp_path, "full", "--set", "harmonize_warmup_steps=2")
    part = run(tmp_path, "part", "--set", "harmonize_warmup_steps=2", "--stop-at", "3")
    assert [r["step"] for r in events(part, "train")] == [1, 2, 3]
    ckpt = torch.load(part / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["position"] == 24 and {"torch", "numpy", "python"} <= set(ckpt["rng"])
    assert main(["pretrain", "--out", str(part), "--resume", "--steps", "6", "--eval-size", "24", "--eval-every", "0",
                 "--log-every", "1", "--no-progress"]) == 0
    a = [(r["step"], r["loss"]) for r in events(full, "train")]
    b = [(r["step"], r["loss"]) for r in events(part, "train")]
    assert a == b  # the same losses, bit for bit, step for step
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 6 and 0.0 <= final["R@1"] <= 1.0
    torch.testing.assert_close(torch.load(full / "checkpoint.pt", weights_only=False)["model"],
                               torch.load(part / "checkpoint.pt", weights_only=False)["model"], rtol=0, atol=0)


def test_short_training_loss_falls_and_outputs(tmp_path, capsys):
    out = run(tmp_path, "fall", "--eval-every", "12", steps=24, batch=12)
    losses = [r["loss"] for r in events(out, "train")]
    assert len(losses) == 24
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    ev = events(out, "eval")
    assert [r["step"] for r in ev] == [12, 24]
    printed = [line for line in capsys.readouterr().out.splitlines() if "held-out R@1" in line]
    assert [line.split(":")[0] for line in printed] == ["step 12", "step 24"]  # printed without the progress bar
    for key in ("R@1", "R@5", "R@10", "mlm_acc", "mem_acc", "mrp_acc", "pairs"):
        assert key in ev[-1]
    train = events(out, "train")[-1]
    assert train["samples_per_s"] > 0 and train["tokens_per_s"] > 0 and "mlm" in train
    assert sorted(os.listdir(out)) == ["best", "checkpoint.pt", "config.json", "log.jsonl"]  # no temp file left
    assert sorted(os.listdir(out / "best")) == ["config.json", "model.pt"]
    model = SCALEModel.from_checkpoint(str(out))
    assert model.config.hidden_size == 32


def test_pretrain_on_manifest_data(tmp_path, capsys):
    cfg = SCALEConfig.tiny()
    data = SyntheticProducts(30, seed=3, config=cfg)
    write_manifest((data[i] for i in range(30)), str(tmp_path / "data"))
    out = run(tmp_path, "real", "--data", str(tmp_path / "data"), "--val-data", str(tmp_path / "data"), steps=3)
    assert len(events(out, "train")) == 3 and events(out, "eval")
    with open(tmp_path / "data" / "manifest.jsonl", "a") as f:
        f.write('{"text": [1, 2], "video": {"features": "video_features.npy", "offset": 0}}\n')
    argv = ["pretrain", "--steps", "1", "--batch-size", "8", "--no-progress", "--threads", "1", "--out",
            str(tmp_path / "bad"), "--data", str(tmp_path / "data"), *SMALL]
    assert main(argv) == 2  # a user's file: one line naming it, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"manifest.jsonl, line 31, field 'video.count'", err[0]), err
    with pytest.raises(DataFormatError, match=r"line 31, field 'video.count'"):
        main(argv + ["--debug"])


def test_micro_batch_matches_plain_steps_and_resumes(tmp_path, capsys):
    def losses(out):
        return [r["loss"] for r in events(out, "train")]

    plain = losses(run(tmp_path, "plain", "--set", "dropout=0.1", steps=3))
    # K = the batch: the same dropout draws, the same steps
    assert losses(run(tmp_path, "whole", "--set", "dropout=0.1", "--micro-batch", "8", steps=3)) == plain
    small = losses(run(tmp_path, "small", "--micro-batch", "3", "--prefetch", "0", steps=3))  # collated in the loop
    part = run(tmp_path, "part", "--micro-batch", "3", "--stop-at", "2", steps=3)
    assert main(["pretrain", "--out", str(part), "--resume", "--eval-size", "24", "--eval-every", "0",
                 "--log-every", "1", "--no-progress"]) == 0  # --micro-batch comes from the checkpoint
    assert losses(part) == small
    assert small == pytest.approx(losses(run(tmp_path, "plain0", steps=3)), rel=1e-5)  # dropout 0: the plain steps
    capsys.readouterr()
    assert main(["pretrain", "--micro-batch", "0"]) == 2
    assert "--micro-batch" in capsys.readouterr().err


@pytest.fixture
def small_manifest(tmp_path):
    """40 products with their own feature sizes (the CLI reads them from the arrays)."""
    cfg = SCALEConfig.tiny(image_feature_dim=12, video_feature_dim=10, audio_feature_dim=8)
    data = SyntheticProducts(40, seed=5, config=cfg)
    write_manifest((data[i] for i in range(40)), str(tmp_path / "data"))
    return tmp_path / "data"


def test_epochs_keep_best_and_early_stopping(tmp_path, small_manifest, capsys):
    out = run(tmp_path, "epochs", "--data", str(small_manifest), "--epochs", "2", "--eval-every", "1", steps=None)
    ev = events(out, "eval")
    assert [r["step"] for r in ev] == [1, 2, 3, 4, 5, 6, 7, 8]  # 32 training products / 8 = 4 steps per epoch
    assert all(r["pairs"]["text->image"]["n"] <= 8 for r in ev)  # the held-out 20%
    done = events(out, "done")[-1]
    best = max(ev, key=lambda r: r["R@1"])
    assert done["best_step"] == min(r["step"] for r in ev if r["R@1"] == best["R@1"]) and done["R@1"] == best["R@1"]
    model = SCALEModel.from_checkpoint(str(out / "best"))  # the kept model scores the best R@1 again
    assert model.config.image_feature_dim == 12
    capsys.readouterr()
    assert main(["eval", str(out / "best"), "--data", str(small_manifest), "--val-fraction", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed.splitlines()[-1])["R@1"] == pytest.approx(best["R@1"])
    assert "text->image" in printed and "model R@1" in printed  # the per-pair table
    # no learning (lr 1e-30 rounds to no update): R@1 never improves, so patience 2 stops 2 evaluations after the first
    out = run(tmp_path, "stop", "--data", str(small_manifest), "--epochs", "5", "--eval-every", "1",
              "--patience", "2", "--lr", "1e-30", steps=None)
    assert events(out, "early_stop")[0]["step"] == 3 and events(out, "done")[-1]["step"] == 3
    capsys.readouterr()
    assert main(["pretrain", "--epochs", "1", "--no-progress"]) == 2
    assert "--epochs needs --data" in capsys.readouterr().err


def test_warning_when_masked_terms_dominate(tmp_path, monkeypatch, capsys):
    import scale_fast.train.trainer as cli

    monkeypatch.setattr(cli, "DOMINANT_STEPS", 3)
    out = run(tmp_path, "heavy", "--set", "mlm_weight=100", steps=4)
    warnings = events(out, "warning")
    assert len(warnings) == 1 and warnings[0]["step"] == 3 and "mlm_weight" in warnings[0]["message"]
    assert "warning: the weighted masked-task losses" in capsys.readouterr().err
    suggested = re.search(r"--set mlm_weight=([0-9.e+-]+) \(now 100\)", warnings[0]["message"])
    assert suggested and 0 < float(suggested.group(1)) < 100, warnings[0]["message"]  # below the current weight
    assert not events(run(tmp_path, "light", "--set", "tasks=[]", steps=4), "warning")


def test_baseline_command(tmp_path, small_manifest, capsys):
    out = run(tmp_path, "model", "--data", str(small_manifest), steps=2)
    capsys.readouterr()
    assert main(["baseline", "--data", str(small_manifest), "--epochs", "3", "--threads", "1",
                 "--model", str(out / "best")]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = json.loads(lines[-1])
    assert summary["train"] == 32 and summary["held_out"] == 8
    assert 0 <= summary["baseline_R@1"] <= 1 and summary["model_R@1"] == events(out, "done")[-1]["R@1"]
    assert "model R@1" in lines[0] and "baseline R@1" in lines[0] and lines[-2].startswith("mean")


def test_run_without_out_says_nothing_is_saved_at_start(capsys):
    argv = ["pretrain", "--steps", "1", "--batch-size", "8", "--eval-size", "24", "--eval-every", "0",
            "--no-progress", "--threads", "1", *SMALL]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "no --out: nothing will be saved" in err
