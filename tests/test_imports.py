"""What an import loads, in a fresh process: the losses without the model, the trainer or tqdm;
the command line's parsing without torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loaded(code: str) -> set:
    """The modules in sys.modules after running `code` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def heavy(modules: set) -> set:
    return {m for m in modules if m == "tqdm" or m.split(".")[:2] in (["scale_fast", "model"], ["scale_fast", "train"])}


def test_the_losses_load_no_model_trainer_or_tqdm():
    modules = loaded("import scale_fast\nfrom scale_fast import scale_loss, SCALELoss, available_backends, MaskedTask\n"
                     "import torch\nscale_loss(torch.randn(2, 3, 4, dtype=torch.float64))")
    assert "scale_fast.functional" in modules and "torch" in modules  # the losses did load
    assert not heavy(modules) - loaded("import torch"), heavy(modules)  # (torch.hub imports tqdm when installed)
    assert not heavy(loaded("import scale_fast")), "import scale_fast loads the model, the trainer or tqdm"


def test_the_model_loads_on_first_use():
    modules = loaded("import scale_fast\nscale_fast.SCALEModel")
    assert "scale_fast.model" in modules and "scale_fast.train" not in modules


def test_the_command_line_answers_without_torch():
    """--help, --version and a mistake are answered before torch is imported (it takes seconds)."""
    modules = loaded("from scale_fast.cli import main\n"
                     "for argv in (['--help'], ['--version'], ['pretrain', '--help'], ['baseline', '--help']):\n"
                     "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
                     "assert main(['pretrain', '--val-fraction', '1.5']) == 2\n"
                     "assert main(['pretrain', '--bogus']) == 2\n"
                     "assert main(['baseline', '--data', '.', '--model', '/nonexistent']) == 2\n")
    assert "scale_fast.cli" in modules and "torch" not in modules
