"""cbam.attach: attention inserted into torchvision, timm and cbam ResNets."""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import cbam
from cbam import CBAM, SE, IdentityBlend, attach, create_model


def randomise_bn(model, seed=0):
    """Non-trivial BN statistics and scales, so that every residual branch contributes (timm
    starts each block's last BN at weight 0, which would make any branch change invisible)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            with torch.no_grad():
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

BACKBONES = {
    "torchvision-resnet18": lambda: torchvision.models.resnet18(),
    "torchvision-resnet50": lambda: torchvision.models.resnet50(),
    "timm-resnet18": lambda: timm.create_model("resnet18", pretrained=False),
    "timm-resnet50d": lambda: timm.create_model("resnet50d", pretrained=False),
    "cbam-resnet18": lambda: create_model("resnet18"),
}
BLOCKS = {"resnet18": 8, "resnet50": 16, "resnet50d": 16}


def attention_layers(model, kind=CBAM):
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_identity_init_keeps_the_outputs_exactly(name):
    model = randomise_bn(BACKBONES[name]())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = outputs(model, X)
    assert attach(model, "cbam", identity_init=True) is model
    assert len(attention_layers(model)) == BLOCKS[name.split("-")[1]]
    assert len(attention_layers(model, IdentityBlend)) == BLOCKS[name.split("-")[1]]
    assert torch.equal(outputs(model, X), before)
    state = model.state_dict()
    for k, v in weights.items():  # pretrained tensors untouched, under their own names
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("name", ["torchvision-resnet18", "timm-resnet18"])
def test_paper_init_changes_the_outputs(name):
    """The default inserts the paper's CBAM with its init: gates near 0.5, not identity."""
    model = randomise_bn(BACKBONES[name]())
    before = outputs(model, X)
    attach(model, "cbam")
    layers = attention_layers(model)
    assert len(layers) == 8 and not attention_layers(model, IdentityBlend)
    assert all(torch.all(m.spatial.bn.weight == 0) for m in layers)  # sigmoid(0) = 0.5
    assert not torch.allclose(outputs(model, X), before, atol=1e-3)


def test_identity_init_learns():
    """alpha gets a gradient at once; after one step the attention is active and trains."""
    model = randomise_bn(torchvision.models.resnet18())
    attach(model, "cbam", identity_init=True)
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(X), torch.tensor([1, 2])).backward()
        blend = model.layer2[0].attention
        mlp_grad = blend.layer.channel.mlp[0].weight.grad
        if step == 0:
            assert blend.alpha.grad is not None and blend.alpha.grad.abs() > 0
            assert mlp_grad is None or torch.all(mlp_grad == 0)  # scaled by alpha = 0
        else:
            assert mlp_grad.abs().max() > 0
        optimiser.step()
    assert model.layer2[0].attention.alpha.item() != 0


def test_torchvision_names_match_cbam_models():
    """An attached torchvision ResNet has exactly the state-dict keys of our own model, so
    weights move between them both ways."""
    tv_model = attach(torchvision.models.resnet50(), "cbam")
    ours = create_model("resnet50", attention="cbam")
    assert set(tv_model.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(randomise_bn(tv_model).state_dict())
    torch.testing.assert_close(outputs(ours.eval(), X), outputs(tv_model, X))


def test_attached_torchvision_model_still_is_torchvision():
    model = attach(torchvision.models.resnet18(), "se")
    block = model.layer1[0]
    assert isinstance(block, torchvision.models.resnet.BasicBlock)
    assert isinstance(block.attention, SE)
    clone = copy.deepcopy(model)  # EMA copies and friends
    torch.testing.assert_close(outputs(clone.eval(), X), outputs(model.eval(), X))


def test_timm_uses_the_se_slot():
    model = timm.create_model("resnet18", pretrained=False)
    attach(model, "cbam", kernel_size=3)
    block = model.layer3[1]
    assert isinstance(block.se, CBAM)
    assert block.se.spatial.conv.kernel_size == (3, 3)
    assert block.se.channel.channels == 256


def test_existing_attention_needs_replace():
    model = timm.create_model("seresnet18", pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"already have attention .*replace=True"):
        attach(model, "cbam")
    assert model.state_dict().keys() == before.keys()
    attach(model, "cbam", replace=True)
    assert isinstance(model.layer1[0].se, CBAM)
    with pytest.raises(ValueError, match="already have attention"):
        attach(create_model("resnet18", attention="se"), "cbam")


def test_unsupported_architecture_lists_what_is_supported():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))
    with pytest.raises(ValueError) as info:
        attach(model, "cbam")
    message = str(info.value)
    assert "Sequential has no convolutional feature maps" in message
    assert "torchvision.models.resnet.BasicBlock" in message
    assert "timm.models.resnet.BasicBlock" in message


def test_bad_attention_changes_nothing():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="unknown argument"):
        attach(model, "cbam", kernel=3)
    with pytest.raises(ValueError, match="between stages"):
        attach(model, "bam")
    with pytest.raises(ValueError, match="unknown attention"):
        attach(model, "cbma")
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert not hasattr(model.layer1[0], "attention")


def test_attached_model_exports_to_onnx(tmp_path):
    model = attach(randomise_bn(torchvision.models.resnet18()), "cbam", identity_init=True)
    with torch.no_grad():
        model.layer1[0].attention.alpha.fill_(0.5)
    path = cbam.export_model(model, tmp_path / "tv.onnx", input_size=64, dynamo=False)
    diffs = cbam.verify_export(model, path, input_size=64)
    assert max(diffs.values()) < 1e-4


def test_replace_with_another_placement():
    """Attached at the residual branches, then replace=True at the SE layers: the new plan's
    paths are the plain network's (they used to be looked up in the wrapped one and fail)."""
    model = torchvision.models.mobilenet_v3_small().eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    cbam.attach(model, "cbam", identity_init=True)
    cbam.attach(model, "cbam", identity_init=True, replace=True, placement="replace-se")
    assert sum(isinstance(m, cbam.CBAM) for m in model.modules()) == 9  # its 9 SE layers
    torch.testing.assert_close(model.eval()(x), before, rtol=0, atol=0)
