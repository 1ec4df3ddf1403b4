"""`scale-fast` as a user meets it: a mistake is one line on stderr naming the flag or file (exit
status 2, no traceback unless --debug), and a stop signal checkpoints the run so that --resume
reaches the same final loss as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scale_fast import __version__
from scale_fast.cli import main
from scale_fast.train.signals import StopSignals

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "hidden_size=32", "--set", "jct_hidden_size=32", "--set", "embed_dim=16"]
QUICK = ["--batch-size", "8", "--eval-size", "16", "--eval-every", "0", "--log-every", "1", "--warmup", "2",
         "--no-progress", "--threads", "1", "--backend", "torch", *SMALL]


def cli(*argv, debug=False) -> subprocess.CompletedProcess:
    """`scale-fast ARGV` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SCALE_FAST_DEBUG", None)
    if debug:
        env["SCALE_FAST_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "scale_fast.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=900)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------- mistakes, through a real process
def test_usage_errors_in_a_process(tmp_path):
    (tmp_path / "file").write_text("x")
    for argv, flag in [
        (["pretrain", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["eval", str(tmp_path / "nowhere")], f"eval {tmp_path / 'nowhere'}: no such folder"),
        (["baseline", "--data", str(tmp_path), "--model", "/nonexistent"], "--model /nonexistent: no such folder"),
        (["pretrain", "--val-fraction", "1.5"], "--val-fraction: must be a fraction between 0 and 1"),
    ]:
        out = cli(*argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert flag in one_line(out.stderr), (argv, out.stderr)


def test_debug_keeps_the_traceback(tmp_path):
    out = cli("eval", str(tmp_path / "nowhere"), debug=True)
    assert out.returncode != 0 and "Traceback" in out.stderr and "UsageError" in out.stderr


# ----------------------------------------------------------------- mistakes, in this process (same code path)
@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["pretrain", "--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    (["pretrain", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["pretrain", "--threads", "0"], "argument --threads: must be a number of threads >= 1 or 'auto', got '0'"),
    (["pretrain", "--lr", "0"], "argument --lr: must be a finite number > 0.0, got 0"),
    (["pretrain", "--lr", "nan"], "argument --lr: must be a finite number > 0.0, got nan"),
    (["pretrain", "--eval-size", "0"], "argument --eval-size: must be >= 1, got 0"),
    (["pretrain", "--log-every", "0"], "argument --log-every: must be >= 1, got 0"),
    (["pretrain", "--device", "gpu0"], "argument --device: not a device: 'gpu0'"),
    (["pretrain", "--backend", "numpy"], "argument --backend: invalid choice: 'numpy'"),
    (["pretrain", "--set", "hidden_size"], "--set expects KEY=VALUE, got 'hidden_size'"),
    (["pretrain", "--set", "no_such_field=1"], "--set: SCALEConfig has no field 'no_such_field'"),
    (["pretrain", "--set", "missing=sometimes"], "--set: SCALEConfig.missing must be one of"),
    (["pretrain", "--config", "{tmp}/none.json"], "--config {tmp}/none.json: no such file or folder"),
    (["pretrain", "--config", "{tmp}/bad.json"], "--config {tmp}/bad.json: Expecting value"),
    (["pretrain", "--data", "{tmp}/none"], "--data {tmp}/none: no such file or folder"),
    (["pretrain", "--out", "{tmp}/file"], "--out {tmp}/file: exists and is not a folder"),
    (["pretrain", "--out", "{tmp}/file/run"], "--out {tmp}/file/run: {tmp}/file is a file, not a folder"),
    (["pretrain", "--log", "{tmp}"], "--log {tmp}: is a folder, not a file"),
    (["pretrain", "--resume"], "--resume needs --out"),
    (["pretrain", "--resume", "--out", "{tmp}/empty"], "--resume: no checkpoint at {tmp}/empty/checkpoint.pt"),
    (["eval", "{tmp}/none"], "eval {tmp}/none: no such folder"),
    (["eval", "{tmp}/empty"], "eval {tmp}/empty: no config.json in it"),
    (["pretrain", "--bogus"], "unrecognized arguments: --bogus"),
    (["pretrain", "--val-fraction", "1.5"], "argument --val-fraction: must be a fraction between 0 and 1"),
    (["eval", "{tmp}/empty", "--val-fraction", "0"], "argument --val-fraction: must be a fraction between 0 and 1"),
    (["baseline", "--data", "{tmp}/empty", "--model", "/nonexistent"], "--model /nonexistent: no such folder"),
    (["baseline", "--data", "{tmp}/none"], "--data {tmp}/none: no such file or folder"),
    (["baseline", "--data", "{tmp}/empty", "--threads", "0"], "argument --threads: must be a number of threads"),
    (["pretrain", "--config", "{tmp}/big.json"], "--config {tmp}/big.json: SCALEConfig.hidden_size must be an int, got 'big'"),
    (["bench", "--ops", "nosuchop"], "--ops: unknown op(s) nosuchop; choose among"),
    (["bench", "--reps", "x"], "argument --reps: invalid int value: 'x'"),
    ([], "the following arguments are required: command"),
])
def test_usage_errors(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.json").write_text("not json")
    (tmp_path / "big.json").write_text('{"hidden_size": "big"}')
    (tmp_path / "empty").mkdir()
    tmp = str(tmp_path)
    assert main([a.replace("{tmp}", tmp) for a in argv]) == 2
    captured = capsys.readouterr()
    line = one_line(captured.err)
    assert line.startswith("scale-fast: error: ") and message.replace("{tmp}", tmp) in line, line
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    assert main(["pretrain", "--device", "cuda"]) == 2
    assert "argument --device: 'cuda': CUDA is not available on this machine" in one_line(capsys.readouterr().err)
    assert main(["eval", "x", "--device", "cuda:0"]) == 2
    assert "CUDA is not available" in one_line(capsys.readouterr().err)


def test_backend_that_cannot_run_here_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SCALE_FAST_DISABLE_CPP", "1")
    from scale_fast.backends.cpp import _build

    saved = dict(_build._state)
    _build.reset()
    try:
        assert main(["pretrain", "--backend", "cpp", "--steps", "1", *QUICK[:-len(SMALL) - 2], *SMALL]) == 2
    finally:
        _build._state.update(saved)
    assert "--backend cpp: backend='cpp' is not available" in one_line(capsys.readouterr().err)


def test_backend_is_ready_before_the_progress_bar_starts(tmp_path, monkeypatch):
    """The first use of backend 'cpp' compiles it: that happens before the bar, not inside step 1."""
    import tqdm

    import scale_fast.train.trainer as cli_module

    order = []
    resolve = cli_module.resolve_backend
    monkeypatch.setattr(cli_module, "resolve_backend", lambda *a: order.append("backend") or resolve(*a))

    class Bar(tqdm.tqdm):
        def __init__(self, *a, **kw):
            order.append("bar")
            super().__init__(*a, **kw)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    argv = ["pretrain", "--steps", "1", *[a for a in QUICK if a != "--no-progress"], "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert order == ["backend", "bar"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"scale-fast {__version__} (torch {torch.__version__})"


# ----------------------------------------------------------------- stop signals
def train_losses(out: Path):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "log.jsonl")) if r["event"] == "train"]


def signal_mid_run(run: Path, steps: int, signum: int, *extra: str):
    """Start `scale-fast pretrain` on `run`, send `signum` once its first step is logged; (status, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "scale_fast.cli", "pretrain", "--steps", str(steps), *QUICK, *extra,
                             "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while proc.poll() is None and not ((run / "log.jsonl").exists() and train_losses(run)):
            time.sleep(0.01)  # no deadline: on a loaded machine the start alone may take minutes
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigint_checkpoints_and_resume_reaches_the_same_loss(tmp_path):
    run, full = tmp_path / "interrupted", tmp_path / "full"
    status, err = signal_mid_run(run, 30, signal.SIGINT)  # long before step 30
    assert status == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert f"scale-fast pretrain --out {run} --resume" in last, err
    stopped = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert 1 <= stopped < 30 and f"stopped after step {stopped}/30" in last
    assert train_losses(run)[-1][0] == stopped

    assert main(["pretrain", "--out", str(run), "--resume", *QUICK]) == 0
    assert main(["pretrain", "--steps", "30", *QUICK, "--out", str(full)]) == 0
    assert train_losses(run) == train_losses(full)  # every step's loss, bit for bit, the last one included
    torch.testing.assert_close(torch.load(run / "checkpoint.pt", weights_only=False)["model"],
                               torch.load(full / "checkpoint.pt", weights_only=False)["model"], rtol=0, atol=0)


def test_resume_with_the_hint_keeps_every_run_setting(tmp_path, capsys):
    """Stopped, then resumed with the printed hint alone: the steps, the evaluation cadence and size
    (and every other setting) come from the checkpoint, so the evaluations are the uninterrupted run's."""
    run, full = tmp_path / "interrupted", tmp_path / "full"
    settings = ["--eval-every", "5", "--eval-size", "12", "--batch-size", "6"]
    status, err = signal_mid_run(run, 30, signal.SIGINT, *settings)
    assert status == 130, err
    hint = shlex.split(err.strip().splitlines()[-1].split("resume with: ")[1])
    assert hint[:2] == ["scale-fast", "pretrain"] and "--resume" in hint
    assert main(hint[1:]) == 0
    assert main(["pretrain", "--steps", "30", *QUICK, *settings, "--out", str(full)]) == 0

    def evaluations(out: Path):
        return [(r["step"], r["R@1"], r["R@5"], r["pairs"]["text->image"]["n"])
                for r in map(json.loads, open(out / "log.jsonl")) if r["event"] == "eval"]
    assert [e[0] for e in evaluations(full)] == [5, 10, 15, 20, 25, 30]
    assert evaluations(run) == evaluations(full)
    assert train_losses(run) == train_losses(full)


def test_resume_refuses_or_logs_a_changed_setting(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--steps", "2", *QUICK, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume", "--lr", "0.5"]) == 2  # another run: refused
    assert "--resume: --lr 0.5 differs from the run's 0.002" in one_line(capsys.readouterr().err)
    assert main(["pretrain", "--out", str(run), "--resume", "--steps", "3", "--eval-every", "3"]) == 0  # honoured
    assert "--resume: --steps 3 (the run had 2), --eval-every 3 (the run had 0)" in capsys.readouterr().err
    resumed = [r for r in map(json.loads, open(run / "log.jsonl")) if r["event"] == "resume"]
    assert resumed[-1]["changed"] == {"steps": [2, 3], "eval_every": [0, 3]}
    assert train_losses(run)[-1][0] == 3


def test_sigterm_exits_143_with_a_checkpoint(tmp_path):
    status, err = signal_mid_run(tmp_path / "run", 400, signal.SIGTERM)
    assert status == 143, err
    assert "SIGTERM: stopped after step" in err and "--resume" in err
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_second_signal_aborts_at_once(capsys):
    stop = StopSignals()
    stop.handle(signal.SIGINT, None)  # the first: noted, training goes on to the end of the step
    assert stop.signum == signal.SIGINT and "Ctrl-C again" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt) as aborted:
        stop.handle(signal.SIGINT, None)
    assert aborted.value.signum == signal.SIGINT
