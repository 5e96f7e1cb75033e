"""Every model at its paper's resolution, forward and backward: minutes on 2 CPU cores."""

import pytest
import torch

from cbam import create_model, list_models
from cbam.models import model_entry

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("attention", [None, "se", "bam", "cbam"])
def test_full_resolution_forward_backward(name, attention):
    entry = model_entry(name)
    torch.manual_seed(0)
    model = create_model(name, attention=attention, num_classes=entry.num_classes)
    x = torch.randn(2, 3, entry.input_size, entry.input_size)
    features = model.forward_features(x)
    assert features.shape[-1] == entry.input_size // model.feature_info[-1]["reduction"]
    logits = model.forward_head(features)
    assert logits.shape == (2, entry.num_classes) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
