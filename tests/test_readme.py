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
    assert result.loss_d is not None and result.penalty is not None and result.penalty.grad_fn is None
    assert len(capsys.readouterr().out.splitlines()) == 1  # the example's one print
