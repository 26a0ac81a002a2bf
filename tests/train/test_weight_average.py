"""The running weight average: its arithmetic, and that swapping it in leaves training intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lineguard.train.weight_average import WeightAverage


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)  # a frozen part (like the backbone) is not averaged
    return model


def test_average_follows_the_weights_with_the_early_step_correction() -> None:
    model = _model()
    avg = WeightAverage(model, decay=0.9)
    assert len(avg.shadow) == 3  # trainable: bias of 0, weight and bias of 1
    start = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    avg.update()  # t = 0: decay min(0.9, 1/10) = 0.1 -> 90 % of the new weights
    assert torch.allclose(avg.shadow[1], start + 0.9)
    for _ in range(200):
        avg.update()
    assert torch.allclose(avg.shadow[1], start + 1.0, atol=1e-6)  # converges to constant weights


def test_swapped_in_scores_the_average_then_restores_the_trained_weights() -> None:
    model = _model()
    avg = WeightAverage(model, decay=0.5)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    avg.shadow[1].fill_(7.0)
    x = torch.ones(2, 3)
    with avg.swapped_in():
        assert torch.all(model[1].weight == 7.0)
        out = model(x)
    assert not torch.allclose(out, model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert model[1].weight.requires_grad  # still trainable, gradients flow as before
    model(x).sum().backward()
    assert model[1].weight.grad is not None


def test_decay_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_model(), decay=1.0)
