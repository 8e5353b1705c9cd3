"""README's library example runs as written (with fewer steps), so the first thing a new user copies works."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_library_example_runs(capsys):
    text = README.read_text()
    code = re.search(r"## Using it as a library\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "range(1000)" in code
    scope: dict = {}
    threads = torch.get_num_threads()
    try:
        exec(compile(code.replace("range(1000)", "range(20)"), str(README), "exec"), scope)
    finally:
        torch.set_num_threads(threads)  # the example sets one thread for the toy: not for the rest of the tests
    stepper, flat = scope["stepper"], scope["flat"]
    assert stepper.steps == 20 and bool(scope["torch"].isfinite(flat.params).all())
    result = scope["result"]
    assert result.loss_d is not None and result.value("g_reg") is not None and result.value("g_reg").grad_fn is None
    assert len(capsys.readouterr().out.splitlines()) == 1  # the example's one print


def test_how_one_step_flows_names_files_and_functions_that_exist():
    """The walk through one step names real files, in the package, and the functions it names are in them."""
    import odegan_kernels

    pkg = Path(odegan_kernels.__file__).parent
    section = re.search(r"## How one step flows\n(.*?)\n## ", README.read_text(), re.S).group(1)
    files = re.findall(r"`([a-z_/]+\.py|csrc/)`", section)
    assert len(files) >= 15, files
    missing = [f for f in files if not (pkg / f).exists() and not (pkg.parent / f).exists()]  # csrc/: the top
    assert not missing, f"README's step walk names files that do not exist: {missing}"
    for path, name in [
        ("train/loop.py", "def train_step"),
        ("train/baselines.py", "def build_optimizer"),
        ("ode/stepper.py", "class ODEStepper"),
        ("graphs.py", "class StepGraph"),
        ("train/closure.py", "class GameClosure"),
        ("game/autograd.py", "class AutogradEngine"),
        ("game/engine.py", "def choose_engine"),
        ("contract.py", "def apply_penalties"),
        ("ops/__init__.py", "def rk_stage"),
    ]:
        assert path in files and name in (pkg / path).read_text(), (path, name)
