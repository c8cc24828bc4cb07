import contextlib

import pytest
import torch
from torch import nn

from gradcomp.integration.capture import capture_gradients, select_layers


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def test_one_neural_record_per_layer_with_right_shape_and_counts():
    m = _model()
    x = torch.randn(5, 1, 8, 8)
    with capture_gradients(m, sample_size=50) as cap:
        for step in range(3):
            ctx = cap.record(step) if step in (0, 2) else contextlib.nullcontext()
            with ctx:
                m(x).sum().backward()
    assert cap.steps == [0, 2]
    recs = cap.by("neural", step=2)
    assert sorted(r.name for r in recs) == ["0", "4"]
    conv = next(r for r in recs if r.name == "0")
    assert conv.shape == (5, 4, 6, 6) and conv.numel == 720 and conv.sample.numel() == 50
    lin = next(r for r in recs if r.name == "4")
    assert lin.shape == (5, 3) and lin.sample.numel() == 15  # small tensor kept whole
    # the whole-tensor reductions agree with the real gradient
    assert torch.equal(lin.sample, torch.ones(15))  # d(sum)/d(out) = 1
    assert int(lin.zeros) == 0 and float(lin.amax) == 1.0


def test_neural_gradient_equals_grad_output():
    m = _model()
    x = torch.randn(5, 1, 8, 8)
    seen = {}
    def keep(mod, gi, go):
        seen["go"] = go[0].clone()

    m[0].register_full_backward_hook(keep)
    with capture_gradients(m, sample_size=None) as cap, cap.record(0):
        m(x.requires_grad_()).square().sum().backward()
    conv = next(r for r in cap.by("neural") if r.name == "0")
    assert torch.equal(conv.sample, seen["go"].reshape(-1))
    assert int(conv.zeros) == int((seen["go"] == 0).sum())


def test_contrast_kinds_and_batchnorm():
    m = _model()
    with capture_gradients(
        m, include_batchnorm=True, kinds=("neural", "activation", "weight", "weight_grad"),
        sample_size=None,
    ) as cap:
        with cap.record(0):
            m(torch.randn(5, 1, 8, 8)).sum().backward()
        m(torch.randn(5, 1, 8, 8)).sum().backward()  # not recorded
    kinds = {(r.name, r.kind) for r in cap.records}
    for name in ("0", "1", "4"):
        assert {(name, k) for k in ("neural", "activation", "weight", "weight_grad")} <= kinds
    wg = next(r for r in cap.records if r.name == "4" and r.kind == "weight_grad")
    assert wg.shape == (3, 144) and len(cap.records) == 12


def test_hooks_removed_on_exit():
    m = _model()
    with capture_gradients(m) as cap:
        pass
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())
    assert cap.records == []


def test_select_layers_errors_and_filters():
    m = _model()
    assert [n for n, _ in select_layers(m)] == ["0", "4"]
    assert [n for n, _ in select_layers(m, names=["4"])] == ["4"]
    with pytest.raises(ValueError, match="unknown layer"):
        select_layers(m, names=["conv9"])
    with pytest.raises(ValueError, match="kinds must be one of"):
        with capture_gradients(m, kinds=("gradient",)):
            pass
