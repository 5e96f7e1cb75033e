"""cbam.attach on every torchvision CNN family and on timm's: identity at attach time, then it
learns; placements, bad input, detection bodies, export."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from _attach_checks import (
    SIZES,
    TRANSFORMER_PREFIXES,
    build_torchvision,
    check_attach_keeps_then_learns,
    randomise_norms,
    run,
    torchvision_classifiers,
)
from cbam import CBAM, attach
from cbam import attach_report as cbam_attach_report
from cbam.interop import IdentityBlend
from cbam.interop.attach import plan_attach
from cbam.interop.attached import Attached, Swapped

# One model per torchvision family (the smallest), for the default suite; the slow test
# walks all of torchvision.models.list_models().
FAMILIES = {
    "resnet18": 8, "resnext50_32x4d": 16, "regnet_x_400mf": 22, "regnet_y_400mf": 16,
    "mobilenet_v2": 10, "mobilenet_v3_small": 6, "efficientnet_b0": 9,
    "efficientnet_v2_s": 35, "mnasnet0_5": 10, "shufflenet_v2_x0_5": 5, "convnext_tiny": 18,
    "googlenet": 5, "inception_v3": 8, "densenet121": 5, "squeezenet1_1": 4, "vgg11": 5,
    "alexnet": 3,
}  # fmt: skip
TIMM_FAMILIES = {
    "resnet18": 8, "seresnet18": 8, "efficientnet_b0": 9, "mobilenetv3_small_050": 7,
    "convnext_atto": 12, "regnety_002": 13, "ghostnet_050": 16, "densenet121": 5,
    "dla34": 12, "rexnet_100": 5, "cspresnet50": 13, "mnasnet_small": 10,
}  # fmt: skip
TIMM_SLOW = [
    "hrnet_w18_small", "res2net50_14w_8s", "dpn68", "vgg11", "resnet50d", "efficientnetv2_rw_t",
    "regnetx_002", "tf_mixnet_s", "nf_resnet26", "resnest14d", "cspdarknet53", "darknet53",
    "xception41", "inception_v3", "inception_v4", "efficientnet_lite0", "fbnetc_100",
    "spnasnet_100", "lcnet_050", "mobileone_s0", "repvgg_a0", "ese_vovnet19b_dw", "selecsls42b",
    "gernet_s", "resnetv2_50", "skresnet18", "tresnet_m", "hardcorenas_a", "regnetz_b16",
    "mobilenetv4_conv_small", "cs3darknet_s", "ghostnetv2_100", "hgnetv2_b0", "repghostnet_050",
    "gcresnet33ts", "nf_regnet_b0",
]  # fmt: skip


@pytest.mark.parametrize("name", list(FAMILIES))
def test_torchvision_family(name):
    count = check_attach_keeps_then_learns(build_torchvision(name), SIZES.get(name, 64))
    assert count == FAMILIES[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_classifiers())
def test_every_torchvision_classifier(name):
    model = build_torchvision(name)
    if name.startswith(TRANSFORMER_PREFIXES):
        with pytest.raises(ValueError, match=r"transformers .* out of scope"):
            attach(model, "cbam", identity_init=True)
        return
    assert check_attach_keeps_then_learns(model, SIZES.get(name, 64)) >= 1


def build_timm(name):
    return timm.create_model(name, pretrained=False, num_classes=10)


@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_timm_family(name):
    # timm's SE-ResNets have SE in the slot CBAM would take: attach asks for replace=True
    # (test_attach.py), or CBAM takes the SE layers' place, starting as them.
    options = {"placement": "replace-se"} if name.startswith("se") else {}
    assert check_attach_keeps_then_learns(build_timm(name), **options) == TIMM_FAMILIES[name]


# Inception needs more than 64 px; NF-RegNet's gated branches pass CBAM's spatial gate its
# first gradient only at the fourth step.
TIMM_OPTIONS = {
    "inception_v3": {"size": 128}, "inception_v4": {"size": 128}, "nf_regnet_b0": {"steps": 4},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_SLOW)
def test_more_timm_families(name):
    assert check_attach_keeps_then_learns(build_timm(name), **TIMM_OPTIONS.get(name, {})) >= 1


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, 32, 8, stride=8)
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1))


def test_transformers_are_refused_as_out_of_scope():
    with pytest.raises(ValueError, match=r"ViT, Swin, MaxViT.*out of scope"):
        attach(TinyTransformer(), "cbam")


class SelectiveKernel(nn.Module):
    """SKNet's softmax over two branches: a CNN's softmax, not attention over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv5 = nn.Conv2d(3, 8, 5, padding=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv3(x), self.conv5(x)
        weights = torch.softmax(torch.stack([a.mean((2, 3)), b.mean((2, 3))], 1), dim=1)
        y = a * weights[:, 0, :, None, None] + b * weights[:, 1, :, None, None]
        return self.fc(y.mean((2, 3)))


def test_a_cnns_own_softmax_is_no_transformer():
    assert plan_attach(SelectiveKernel()).sites


def test_an_example_input_the_model_cannot_take_is_named():
    with pytest.raises(ValueError, match=r"on example_input of shape \(3, 64, 64\): .*4D"):
        attach(torchvision.models.mobilenet_v2(), "cbam", example_input=torch.randn(3, 64, 64))


def test_model_without_feature_maps_is_an_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))
    with pytest.raises(ValueError, match="no convolutional feature maps"):
        attach(mlp, "cbam")
    with pytest.raises(ValueError, match="could not run Linear"):
        attach(nn.Linear(10, 2), "cbam")


def test_unknown_placement_and_residual_without_adds():
    with pytest.raises(ValueError, match=r"unknown placement 'resdual'.*residual"):
        attach(torchvision.models.mobilenet_v2(), "cbam", placement="resdual")
    with pytest.raises(ValueError, match=r"no residual adds.*placement='stage'"):
        attach(torchvision.models.squeezenet1_1(), "cbam", placement="residual")
    with pytest.raises(ValueError, match="has no SE layers"):
        attach(torchvision.models.mobilenet_v2(), "cbam", placement="replace-se")


def test_attaching_twice_needs_replace():
    model = attach(torchvision.models.mobilenet_v2(num_classes=10), "cbam", identity_init=True)
    first = [m for m in model.modules() if isinstance(m, Attached)]
    with pytest.raises(ValueError, match=r"already has attention attached at 10 .*replace=True"):
        attach(model, "cbam")
    assert [m for m in model.modules() if isinstance(m, Attached)] == first  # unchanged
    attach(model, "se", replace=True, placement="stage")
    assert not any(isinstance(m, CBAM) for m in model.modules())
    assert sum(isinstance(m, Attached) for m in model.modules()) == 5


def test_replace_se_starts_as_the_se_layers():
    model = randomise_norms(torchvision.models.mobilenet_v3_small(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    before = run(model, x)
    attach(model, "cbam", identity_init=True, placement="replace-se")
    swapped = [m for m in model.modules() if isinstance(m, Swapped)]
    assert len(swapped) == 9
    assert all(isinstance(m.module, torchvision.ops.SqueezeExcitation) for m in swapped)
    torch.testing.assert_close(run(model, x), before, rtol=0, atol=1e-6)
    plain = attach(torchvision.models.mobilenet_v3_small(), "cbam", placement="replace-se")
    assert not any(isinstance(m, torchvision.ops.SqueezeExcitation) for m in plain.modules())


def test_stage_placement_on_a_resnet():
    plan = plan_attach(torchvision.models.resnet18(), "stage")
    assert [s.path for s in plan.sites] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert [s.channels for s in plan.sites] == [64, 64, 128, 256, 512]


def test_state_dict_names_stay_the_plain_models():
    plain = torchvision.models.mobilenet_v2(num_classes=10)
    model = attach(torchvision.models.mobilenet_v2(num_classes=10), "cbam", identity_init=True)
    keys = set(model.state_dict())
    assert set(plain.state_dict()) <= keys
    assert all(".attention." in k for k in keys - set(plain.state_dict()))
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".attention." in k for k in result.missing_keys)
    torch.testing.assert_close(run(model.eval(), torch.randn(1, 3, 64, 64)),
                               run(plain.eval(), torch.randn(1, 3, 64, 64)))  # fmt: skip
    again = attach(torchvision.models.mobilenet_v2(num_classes=10), "cbam", identity_init=True)
    again.load_state_dict(model.state_dict())  # round trip, strict


def test_attached_mobilenet_exports_and_runs_channels_last_and_bf16(tmp_path):
    import cbam

    plain = randomise_norms(torchvision.models.mobilenet_v3_small(num_classes=10))
    model = half_open(attach(plain, "cbam", identity_init=True))
    path = cbam.export_model(model, tmp_path / "m.onnx", input_size=64, dynamo=False)
    assert max(cbam.verify_export(model, path, input_size=64).values()) < 1e-4
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model.eval(), (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    expected = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last)), expected,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x)).all()


def half_open(model: nn.Module) -> nn.Module:
    """Every identity-init blend halfway (alpha = 0.5), so the attention's output counts."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IdentityBlend):  # not MNASNet's own `alpha`, its width
                m.alpha.fill_(0.5)
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [f"torchvision:{n}" for n in FAMILIES] + [f"timm:{n}" for n in TIMM_FAMILIES]
)
def test_attached_family_compiles(name):
    """torch.compile (inductor) of each family's attached model matches eager: the
    coverage table's compile column (docs/interop.md)."""
    source, _, arch = name.partition(":")
    model = build_torchvision(arch) if source == "torchvision" else build_timm(arch)
    options = {"placement": "replace-se"} if arch.startswith("se") else {}
    model = half_open(attach(randomise_norms(model), "cbam", identity_init=True, **options))
    x = torch.randn(2, 3, SIZES.get(arch, 64), SIZES.get(arch, 64))
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model)(x), expected, rtol=1e-4, atol=1e-4)


def test_new_layers_take_the_models_dtype():
    model = torchvision.models.mobilenet_v3_small(num_classes=10).double()
    attach(model, "cbam", identity_init=True, placement="replace-se")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_attached_model_trains_under_ddp(tmp_path):
    """One gloo process: DDP's parameter and buffer handling sees the wrappers' modules."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = attach(torchvision.models.mobilenet_v3_small(num_classes=10), "cbam",
                   identity_init=True)  # fmt: skip
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        loss = nn.functional.cross_entropy(ddp(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
        loss.backward()
        alphas = [p for n, p in model.named_parameters() if n.endswith("alpha")]
        assert len(alphas) == 6 and all(p.grad is not None for p in alphas)
    finally:
        dist.destroy_process_group()


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class UsersResidualNet(nn.Module):
    """A network as a user writes one: no block classes, the residual adds in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16), nn.ReLU())
        self.branch1 = nn.Sequential(conv_bn(16, 16), nn.ReLU(), conv_bn(16, 16))
        self.down = nn.Sequential(conv_bn(16, 32, stride=2), nn.ReLU())
        self.branch2 = nn.Sequential(conv_bn(32, 32), nn.ReLU(), conv_bn(32, 32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.branch1(x))
        x = self.down(x)
        x = torch.relu(self.branch2(x) + x)
        return self.fc(x.mean((2, 3)))


def users_plain_net() -> nn.Module:
    return nn.Sequential(
        conv_bn(3, 16), nn.ReLU(), conv_bn(16, 16), nn.ReLU(), nn.MaxPool2d(2),
        conv_bn(16, 32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def test_a_users_own_networks():
    plan = plan_attach(UsersResidualNet())
    assert [(s.path, s.channels, s.placement) for s in plan.sites] == [
        ("branch1", 16, "residual"), ("branch2", 32, "residual"),
    ]  # fmt: skip
    assert check_attach_keeps_then_learns(UsersResidualNet()) == 2
    plan = plan_attach(users_plain_net())
    assert plan.placement == "stage"
    assert [(s.path, s.channels) for s in plan.sites] == [("3", 16), ("6", 32)]
    assert check_attach_keeps_then_learns(users_plain_net()) == 2


def test_attach_with_report_prints_what_it_did(capsys):
    model = UsersResidualNet()
    params = sum(p.numel() for p in model.parameters())
    assert attach(model, "cbam", identity_init=True, report=True) is model
    out = capsys.readouterr().out
    added = sum(p.numel() for p in model.parameters()) - params
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 2
    assert "UsersResidualNet: 2 attention layer(s), placement 'residual'" in out
    assert f"params: {params / 1e6:.3f} M + {added / 1e6:.4f} M" in out
    assert "  branch1        16  residual" in out and "MACs at 224 px" in out
    report = cbam_attach_report(UsersResidualNet(), input_size=None)
    assert report.params_added == added and report.macs is None
