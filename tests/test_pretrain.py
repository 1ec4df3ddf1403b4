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
    argv = ["pretrain", "--steps", str(steps), "--batch-size", str(batch), "--eval-size", "24", "--eval-every", "0",
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
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "log.jsonl"]  # no temp file left
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
