"""The README's first Python example, run verbatim with the API defaults, trains as well as the
same script without compression (a small CNN on scikit-learn's digits)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[2] / "README.md"
EPOCHS = 4


def _first_python_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # the one line a user fills in: the model (given to the script below)
    lines = [ln for ln in code.splitlines() if not ln.startswith("model = ...")]
    assert len(lines) == len(code.splitlines()) - 1, "the README example no longer has model = ..."
    return "\n".join(lines)


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )


class _Loader:
    """Shuffled mini-batches of 32, a new order each epoch (a DataLoader without its
    per-sample collation cost)."""

    def __init__(self, x, y, seed):
        self.x, self.y, self.g = x, y, torch.Generator().manual_seed(seed)

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.g)
        for i in range(0, len(perm), 32):
            idx = perm[i:i + 32]
            yield self.x[idx], self.y[idx]


def _train_accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def _run(compressed: bool) -> tuple[float, dict | None]:
    x, y = _digits()
    torch.manual_seed(0)
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    scope = {"model": model, "loader": _Loader(x, y, 1), "opt": opt, "epochs": EPOCHS}
    code = _first_python_example()
    if not compressed:  # the same script without compression
        code = "\n".join(ln for ln in code.splitlines()
                         if "handle" not in ln and "CompressionConfig" not in ln
                         and not ln.startswith(("cfg", "    prune=", "    quantize=", ")")))
        code = code.replace("        opt.zero_grad(); loss.backward()",
                            "        opt.zero_grad(); loss.backward(); opt.step()")
        assert "opt.step()" in code
    exec(compile(code, "README.md", "exec"), scope)
    handle = scope.get("handle")
    return _train_accuracy(model, x, y), handle


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than they save
    yield
    torch.set_num_threads(n)


def test_readme_example_trains_as_well_as_uncompressed(capsys, one_thread):
    base, _ = _run(compressed=False)
    acc, handle = _run(compressed=True)
    out = capsys.readouterr().out
    assert "'sparsity'" in out  # the example printed its metrics each epoch
    assert handle is not None and not handle.registered  # handle.remove() ran
    assert base > 0.95  # the uncompressed script really trains
    assert acc >= base - 0.01, (acc, base)  # within 1 point of it
