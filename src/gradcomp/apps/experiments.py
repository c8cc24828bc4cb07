"""Short training runs that capture real gradients: the input of ``analyze`` and ``sparsity``."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from gradcomp.apps.data import load_dataset, make_loader
from gradcomp.apps.models import build_model
from gradcomp.integration.capture import GradientRecord, capture_gradients

__all__ = ["CaptureRun", "train_and_capture", "collect_neural_gradients", "default_capture_steps"]


@dataclass
class CaptureRun:
    model: str
    dataset: str
    steps: int
    capture_steps: list[int]
    records: list[GradientRecord]
    losses: list[float] = field(default_factory=list)
    test_accuracy: float = float("nan")
    seconds: float = 0.0


def default_capture_steps(steps: int, points: int = 4) -> list[int]:
    """``points`` steps spread over training, first and last included (step 0 = initialisation)."""
    if steps <= points:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (points - 1)) for i in range(points)})


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over a loader; one host sync at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        n += y.numel()
    model.train(was_training)
    if n == 0:
        return float("nan"), float("nan")
    return float(loss_sum) / n, float(correct) / n


def train_and_capture(
    model: str = "resnet20",
    dataset: str = "fashion-mnist",
    *,
    steps: int = 300,
    capture_steps: list[int] | None = None,
    sample_size: int | None = 100_000,
    kinds=("neural",),
    include_batchnorm: bool = False,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    device: str | None = "cpu",
    data_dir: str | None = None,
    max_train: int | None = None,
    width: int | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
) -> CaptureRun:
    """Train ``model`` on ``dataset`` for ``steps`` steps; capture gradients at ``capture_steps``.

    The regime is the paper's (SGD, momentum 0.9, weight decay 1e-4) at a constant ``lr``; steps
    run over as many epochs as needed. Everything is seeded by ``seed``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    capture_steps = default_capture_steps(steps) if capture_steps is None else sorted(capture_steps)
    bad = [s for s in capture_steps if not 0 <= s < steps]
    if bad:
        raise ValueError(f"capture_steps must lie in [0, {steps - 1}], got {bad}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    data = load_dataset(dataset, data_dir, max_train=max_train)
    net = build_model(
        model, in_channels=data.in_channels, num_classes=data.num_classes,
        image_size=data.image_size, width=width,
    ).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    loader = make_loader(data.train, batch_size, shuffle=True, seed=seed, drop_last=True)
    want = set(capture_steps)
    losses: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with capture_gradients(
        net, kinds=kinds, include_batchnorm=include_batchnorm, sample_size=sample_size, seed=seed
    ) as cap:
        bar = tqdm(total=steps, desc=f"train {model}/{dataset}", disable=not progress, leave=False)
        step, epoch = 0, 0
        net.train()
        while step < steps:
            loader.set_epoch(epoch)
            for x, y in loader:
                if step >= steps:
                    break
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                ctx = cap.record(step) if step in want else contextlib.nullcontext()
                with ctx:
                    loss = nn.functional.cross_entropy(net(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                losses.append(loss.detach())
                step += 1
                bar.update(1)
            epoch += 1
        bar.close()
    acc = float("nan")
    if evaluate_test:
        _, acc = evaluate(net, make_loader(data.test, 512, shuffle=False), dev)
    return CaptureRun(
        model=model, dataset=dataset, steps=steps, capture_steps=capture_steps,
        records=cap.records, losses=torch.stack(losses).cpu().tolist(),
        test_accuracy=acc, seconds=time.perf_counter() - t0,
    )


def collect_neural_gradients(
    model: str = "resnet20",
    dataset: str = "fashion-mnist",
    steps: int = 300,
    capture_steps: list[int] | None = None,
    sample_size: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
    device: str | None = "cpu",
    data_dir: str | None = None,
    progress: bool = True,
    **kw,
) -> list[GradientRecord]:
    """Neural-gradient records (kind "neural") of a short run; see ``train_and_capture``."""
    run = train_and_capture(
        model, dataset, steps=steps, capture_steps=capture_steps, sample_size=sample_size,
        batch_size=batch_size, seed=seed, device=device, data_dir=data_dir, progress=progress,
        evaluate_test=False, **kw,
    )
    return run.records
