"""Short training runs that capture real gradients: the input of ``analyze`` and ``sparsity``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from gradcomp.apps.train import StepHook, TrainConfig, train
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
    test_accuracy: float = float("nan")  # image datasets
    val_loss: float = float("nan")  # text datasets (validation split)
    val_accuracy: float = float("nan")
    val_perplexity: float = float("nan")  # language model: exp(val_loss)
    seconds: float = 0.0


def default_capture_steps(steps: int, points: int = 4) -> list[int]:
    """``points`` steps spread over training, first and last included (step 0 = initialisation)."""
    if steps <= points:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (points - 1)) for i in range(points)})


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
    context: int | None = None,
    optimizer: str = "sgd",
    max_test: int | None = None,
) -> CaptureRun:
    """Train ``model`` on ``dataset`` for ``steps`` steps; capture gradients at ``capture_steps``.

    The regime is the paper's (SGD, momentum 0.9, weight decay 1e-4) at a constant ``lr``
    (``optimizer`` "adamw" for transformers); steps run over as many epochs as needed.
    ``context``: bytes per sequence of a text dataset (None: its default); ``max_test``:
    evaluate on the first N test images / validation sequences. Everything is seeded by
    ``seed``. The training is
    :func:`gradcomp.apps.train.train` (baseline recipe) with a capture hook around the chosen
    steps, so a capture run and ``gradcomp train`` follow the same trajectory.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    capture_steps = default_capture_steps(steps) if capture_steps is None else sorted(capture_steps)
    bad = [s for s in capture_steps if not 0 <= s < steps]
    if bad:
        raise ValueError(f"capture_steps must lie in [0, {steps - 1}], got {bad}")
    cfg = TrainConfig(
        recipe="baseline", model=model, dataset=dataset, batch_size=batch_size, lr=lr,
        optimizer=optimizer, momentum=0.9, weight_decay=1e-4, schedule="constant", seed=seed,
        device="auto" if device is None else str(device), data_dir=data_dir,
        max_train=max_train, width=width, progress=progress, max_steps=steps,
        evaluate=evaluate_test, context=context, max_test=max_test,
    )
    hook = _CaptureHook(set(capture_steps), kinds=kinds, include_batchnorm=include_batchnorm,
                        sample_size=sample_size, seed=seed)
    res = train(cfg, hook)
    return CaptureRun(
        model=model, dataset=dataset, steps=steps, capture_steps=capture_steps,
        records=hook.records, losses=res.loss_trace, test_accuracy=res.test_accuracy,
        val_loss=res.val_loss, val_accuracy=res.val_accuracy, val_perplexity=res.val_perplexity,
        seconds=res.seconds,
    )


class _CaptureHook(StepHook):
    """Records gradients (``capture_gradients``) during the chosen steps of ``train``."""

    def __init__(self, steps: set[int], **capture_kw):
        self.steps = steps
        self.kw = capture_kw
        self.records: list[GradientRecord] = []
        self._cm = None
        self._cap = None

    def attach(self, model) -> None:
        self._cm = capture_gradients(model, **self.kw)
        self._cap = self._cm.__enter__()

    def around(self, step: int):
        return self._cap.record(step) if step in self.steps else contextlib.nullcontext()

    def detach(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self.records = self._cap.records
            self._cm = None


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
