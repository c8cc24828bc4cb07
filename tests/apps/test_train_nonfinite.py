"""A NaN injected into one compressed layer's neural gradient: the default ``nonfinite="skip"``
skips that optimizer step (counted), keeps the weights finite, and training goes on."""

import math

import pytest
import torch
from torch import nn

from gradcomp.apps.train import StepHook, TrainConfig, train

SMALL = dict(model="cnn", dataset="synthetic", batch_size=32, width=4, progress=False,
             max_steps_per_epoch=6, lr=0.05, evaluate=False)


class PoisonStep(StepHook):
    """Sets one element of the second conv's neural gradient to NaN at global step ``k`` (a
    tensor hook registered before the compressor's, so the compressor receives the NaN)."""

    def __init__(self, k: int):
        self.k, self.step, self.hits = k, -1, 0

    def attach(self, model):
        self.model = model
        conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]

        def forward_hook(module, inputs, output):
            if self.step == self.k and output.requires_grad:
                def poison(g):
                    self.hits += 1
                    g = g.clone()
                    g.view(-1)[7] = math.nan
                    return g

                output.register_hook(poison)

        self._h = conv.register_forward_hook(forward_hook, prepend=True)

    def around(self, step):
        self.step = step
        return super().around(step)

    def detach(self):
        self._h.remove()


@pytest.mark.parametrize("recipe, k", [("fp6", 3), ("prune-0.8", 3), ("prune-0.8-emp", 6),
                                       ("fp4-dynamic", 3)])
def test_injected_nan_skips_the_step_and_training_continues(recipe, k):
    # k = 6: the first step of epoch 2, a statistics (refresh) step; k = 3 a plain step
    poison = PoisonStep(k)
    res = train(TrainConfig(recipe=recipe, epochs=2, seed=1, **SMALL), hook=poison)
    assert poison.hits == 1
    skipped = [row["skipped_steps"] for row in res.history]
    assert res.history[-1]["skipped_steps_total"] == sum(skipped)
    if recipe.endswith("dynamic"):
        # the dynamic loss scale also skips its own overflow steps: at least the poisoned one
        assert skipped[k // 6] >= 1
    else:
        assert skipped == ([1, 0] if k < 6 else [0, 1])
    assert all(math.isfinite(v) for v in res.loss_trace) and len(res.loss_trace) == 12
    assert all(bool(torch.isfinite(p).all()) for p in poison.model.parameters())


def test_keep_policy_lets_the_nan_into_the_weights():
    """The contrast that makes the test above meaningful: ``nonfinite="keep"`` takes the step."""
    import dataclasses

    from gradcomp.apps.recipes import get_recipe

    r = get_recipe("prune-0.8-emp")
    r = dataclasses.replace(r, name="prune-0.8-emp-keep", compression=dataclasses.replace(
        r.compression, nonfinite="keep"))
    poison = PoisonStep(3)
    res = train(TrainConfig(recipe=r, epochs=1, seed=1, **SMALL), hook=poison)
    assert poison.hits == 1 and res.history[-1]["skipped_steps_total"] == 0
    assert not all(bool(torch.isfinite(p).all()) for p in poison.model.parameters())
    assert not math.isfinite(res.loss_trace[-1])
