import pytest
import torch
from torch import nn

import cbam
from cbam import BAM, CBAM, SE, create_model, list_models
from cbam.complexity import count_parameters, measure
from cbam.paper import IMAGENET_CLASSIFICATION

ALL_MODELS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet18",
    "resnext50_32x4d", "resnext101_32x4d", "mobilenet_v1",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
]  # fmt: skip

PAPER_CONFIGS = {
    "resnet18": ("resnet18", {}),
    "resnet34": ("resnet34", {}),
    "resnet50": ("resnet50", {}),
    "resnet101": ("resnet101", {}),
    "wide_resnet18(widen=1.5)": ("wide_resnet18", {"widen": 1.5}),
    "resnext50_32x4d": ("resnext50_32x4d", {}),
    "mobilenet_v1(width_mult=0.7)": ("mobilenet_v1", {"width_mult": 0.7}),
}


def meta_model(name, attention=None, **kwargs):
    with torch.device("meta"):
        return create_model(name, attention=attention, **kwargs)


def test_registry_lists_every_model():
    assert sorted(list_models()) == sorted(ALL_MODELS)
    assert list_models("resnext*") == ["resnext50_32x4d", "resnext101_32x4d"]


def test_paper_table_covers_every_row():
    assert set(IMAGENET_CLASSIFICATION) == set(PAPER_CONFIGS)


@pytest.mark.parametrize("label", list(PAPER_CONFIGS))
@pytest.mark.parametrize("attention", ["none", "se", "cbam"])
def test_parameter_counts_match_the_paper(label, attention):
    name, kwargs = PAPER_CONFIGS[label]
    params = count_parameters(meta_model(name, attention, **kwargs))
    assert round(params / 1e6, 2) == IMAGENET_CLASSIFICATION[label][attention].params_m


@pytest.mark.parametrize(
    ("spatial", "kernel_size", "paper_m"),
    [("conv1x1", 3, 28.10), ("conv1x1", 7, 28.10), ("pool", 3, 28.09), ("pool", 7, 28.09)],
)
def test_spatial_ablation_parameter_counts(spatial, kernel_size, paper_m):
    model = meta_model(
        "resnet50", "cbam", attention_kwargs={"spatial": spatial, "kernel_size": kernel_size}
    )
    assert round(count_parameters(model) / 1e6, 2) == paper_m


@pytest.mark.parametrize("label", list(PAPER_CONFIGS))
@pytest.mark.parametrize("attention", ["se", "cbam"])
def test_attention_gflops_increment_matches_the_paper(label, attention):
    name, kwargs = PAPER_CONFIGS[label]
    _, base = measure(name, None, **kwargs)
    _, ours = measure(name, attention, **kwargs)
    paper = IMAGENET_CLASSIFICATION[label]
    paper_increment = paper[attention].gflops - paper["none"].gflops
    assert abs((ours - base) / 1e9 - paper_increment) <= 0.002 + 1e-9


@pytest.mark.parametrize(("depth", "paper_m"), [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85)])
def test_cifar_resnets_match_the_resnet_paper(depth, paper_m):
    # He et al. 2016, Table 6 (option A shortcuts, 10 classes); resnet110 is "1.7M".
    assert round(count_parameters(meta_model(f"resnet{depth}", num_classes=10)) / 1e6, 2) == paper_m
    assert round(count_parameters(meta_model("resnet110", num_classes=10)) / 1e6, 1) == 1.7


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("attention", [None, "se", "bam", "cbam"])
def test_every_model_trains_on_small_images(name, attention):
    torch.manual_seed(0)
    model = create_model(name, attention=attention, num_classes=7, in_chans=1, small_input=True)
    x = torch.randn(2, 1, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


def test_imagenet_stem_and_small_stem():
    big = create_model("resnet18")
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    small = create_model("resnet18", small_input=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert big.forward_features(x).shape[-1] == 1
    assert small.forward_features(x).shape[-1] == 4
    mobile = create_model("mobilenet_v1", small_input=True)
    assert mobile.stem[0].stride == (1, 1)


def test_attention_sits_in_every_block_before_the_residual_add():
    model = create_model("resnet50", attention="cbam")
    blocks = [b for name in model.stage_names for b in getattr(model, name)]
    assert len(blocks) == 16
    assert all(isinstance(b.attention, CBAM) for b in blocks)
    firsts = [getattr(model, name)[0].attention for name in model.stage_names]
    assert [a.channel.mlp[0].in_features for a in firsts] == [256, 512, 1024, 2048]

    block = model.layer2[1].eval()
    x = torch.randn(2, 512, 8, 8)
    seen = {}
    block.attention.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    out = block(x)
    assert torch.equal(seen["inp"], block.bn3(block.conv3(block.relu(block.bn2(block.conv2(
        block.relu(block.bn1(block.conv1(x)))))))))  # fmt: skip
    torch.testing.assert_close(out, torch.relu(seen["out"] + x))


def test_bam_sits_at_stage_boundaries():
    model = create_model("resnet50", attention="bam")
    bams = [(name, m.channels) for name, m in model.named_modules() if isinstance(m, BAM)]
    assert bams == [("layer1.3", 256), ("layer2.4", 512), ("layer3.6", 1024)]
    cifar = create_model("resnet20", attention="bam", attention_kwargs={"reduction": 4})
    assert [m.channels for m in cifar.modules() if isinstance(m, BAM)] == [16, 32]
    mobile = create_model("mobilenet_v1", attention="bam")
    assert [m.channels for m in mobile.modules() if isinstance(m, BAM)] == [64, 128, 256, 512]
    assert not any(isinstance(m, CBAM) for m in model.modules())


def test_mobilenet_gates_follow_both_depthwise_and_pointwise_convs():
    model = create_model("mobilenet_v1", attention="se", width_mult=0.7)
    gates = [m for m in model.modules() if isinstance(m, SE)]
    assert len(gates) == 26
    assert gates[0].channels == 22 and gates[1].channels == 45 and gates[-1].channels == 717


def test_attention_kwargs_reach_every_layer():
    model = create_model(
        "resnet18", "cbam", attention_kwargs={"kernel_size": 3, "pool_types": ("avg",)}
    )
    gates = [m for m in model.modules() if isinstance(m, CBAM)]
    assert len(gates) == 8
    assert all(
        g.spatial.conv.kernel_size == (3, 3) and g.channel.pool_types == ["avg"] for g in gates
    )


def test_spatial_bn_weight_survives_model_init():
    model = create_model("resnet18", "cbam")
    for m in model.modules():
        if isinstance(m, CBAM):
            assert torch.all(m.spatial.bn.weight == 0)
            assert torch.all(m.channel.mlp[0].bias == 0)
    assert torch.all(model.bn1.weight == 1)


def test_forward_features_head_and_reset_classifier():
    model = create_model("resnet18", attention="cbam", num_classes=10, small_input=True).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 512, 4, 4)
    assert model.forward_head(features, pre_logits=True).shape == (2, 512)
    torch.testing.assert_close(model.forward_head(features), model(x))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    assert [f["num_chs"] for f in model.feature_info] == [64, 128, 256, 512]
    assert [f["reduction"] for f in model.feature_info] == [1, 2, 4, 8]
    assert [f["reduction"] for f in create_model("resnet50").feature_info] == [4, 8, 16, 32]


def test_torchvision_names_and_shapes():
    torchvision = pytest.importorskip("torchvision")
    ours = create_model("resnext50_32x4d").state_dict()
    theirs = torchvision.models.resnext50_32x4d().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_custom_attention_callable():
    model = create_model("resnet18", attention=lambda c: SE(c, reduction=4))
    assert sum(isinstance(m, SE) for m in model.modules()) == 8


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: create_model("resnet51"), ValueError, "unknown model 'resnet51'.*did you mean"),
        (lambda: create_model("resnet18", attention="cbma"), ValueError, "unknown attention"),
        (lambda: create_model("resnet18", widen=2.0), ValueError, "unknown argument.*'widen'"),
        (
            lambda: create_model("resnet18", "cbam", attention_kwargs={"kernel": 3}),
            ValueError,
            "attention CBAM got unknown argument.*'kernel'.*kernel_size",
        ),
        (
            lambda: create_model("resnet18", attention_kwargs={"reduction": 8}),
            ValueError,
            "attention is None",
        ),
        (
            lambda: create_model("resnet20", attention="se", attention_kwargs={"reduction": 32}),
            ValueError,
            "reduction=32 is larger than channels=16",
        ),
        (lambda: create_model("wide_resnet18", widen=0), ValueError, "widen must be a positive"),
        (lambda: create_model("mobilenet_v1", width_mult=-1), ValueError, "width_mult"),
        (lambda: create_model("resnet18", num_classes=-3), ValueError, "num_classes"),
        (lambda: create_model("resnet20", shortcut="B"), ValueError, "unknown shortcut"),
    ],
)
def test_bad_model_arguments_are_clear_errors(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_wrong_image_batches_are_clear_errors():
    model = create_model("resnet18", in_chans=1, small_input=True)
    with pytest.raises(ValueError, match=r"N x 1 x H x W, got shape \[2, 3, 32, 32\].*in_chans=3"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.randn(1, 32, 32))


def test_top_level_api():
    for name in (
        "CBAM",
        "SE",
        "BAM",
        "ChannelAttention",
        "SpatialAttention",
        "create_model",
        "list_models",
        "create_attention",
        "list_attentions",
    ):
        assert hasattr(cbam, name), name
