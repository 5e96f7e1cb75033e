"""Loading the CBAM authors' checkpoints, torchvision's weights and bad files.

The authors' state dict is written here from REFERENCE.md section 1 alone (key names,
shapes, the DataParallel prefix and the training script's wrapper), filled with random
values, and the loaded model is compared with a forward pass computed directly from those
tensors with torch.nn.functional, so neither side borrows from the code under test.
"""

import math
import os
import pathlib
import pickle
import zipfile

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision

import cbam
from cbam import CheckpointError, create_model, load_checkpoint, load_official, load_torchvision
from cbam.interop import convert_official, read_checkpoint

DEPTHS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}


# --- the authors' checkpoint, from REFERENCE.md section 1 -------------------------------------


def official_shapes(depth: int, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' ResNet+CBAM (ImageNet), without the `module.` prefix."""
    kind, layers = DEPTHS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(name, channels):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{suffix}"] = (channels,)
        shapes[f"{name}.num_batches_tracked"] = ()

    bn("bn1", 64)
    in_ch = 64
    for stage, (planes, blocks) in enumerate(
        zip((64, 128, 256, 512), layers, strict=True), start=1
    ):
        out_ch = planes * expansion
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            if kind == "bottleneck":
                convs = [(planes, in_ch, 1), (planes, planes, 3), (out_ch, planes, 1)]
            else:
                convs = [(planes, in_ch, 3), (planes, planes, 3)]
            for j, (o, c, k) in enumerate(convs, start=1):
                shapes[f"{p}.conv{j}.weight"] = (o, c, k, k)
                bn(f"{p}.bn{j}", o)
            if i == 0 and (stage > 1 or in_ch != out_ch):
                shapes[f"{p}.downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                bn(f"{p}.downsample.1", out_ch)
            gate = f"{p}.cbam.ChannelGate.mlp"
            shapes[f"{gate}.1.weight"] = (out_ch // 16, out_ch)
            shapes[f"{gate}.1.bias"] = (out_ch // 16,)
            shapes[f"{gate}.3.weight"] = (out_ch, out_ch // 16)
            shapes[f"{gate}.3.bias"] = (out_ch,)
            shapes[f"{p}.cbam.SpatialGate.spatial.conv.weight"] = (1, 2, 7, 7)
            bn(f"{p}.cbam.SpatialGate.spatial.bn", 1)
            in_ch = out_ch
    shapes["fc.weight"] = (num_classes, in_ch)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random values on a scale that keeps a deep network's activations finite and varied."""
    if name.endswith("num_batches_tracked"):
        return torch.randint(1, 10_000, (), generator=g)
    if name.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    if name.endswith("running_mean") or name.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if name.endswith("weight") and len(shape) == 1:  # BN scale
        return 0.5 + 0.5 * torch.rand(shape, generator=g)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)


def official_state_dict(depth: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"module.{k}": random_tensor(k, s, g) for k, s in official_shapes(depth).items()}


def wrap_as_training_script(state_dict):
    """What the authors' train_imagenet.py passes to torch.save."""
    return {
        "epoch": 100,
        "arch": "resnet",
        "state_dict": state_dict,
        "best_prec1": torch.tensor(77.622),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9}]},
    }


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int) -> torch.Tensor:
    """ResNet+CBAM written out with torch.nn.functional from the authors' tensors (their
    pools: avg_pool2d / max_pool2d over the whole map; [max, mean] channel pool; BN eps 1e-5;
    AvgPool2d(7) before fc, which needs a 224 x 224 input)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}

    def bn(t, name):
        return F.batch_norm(
            t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
            sd[f"{name}.bias"], training=False, eps=1e-5,
        )  # fmt: skip

    def cbam_module(t, p):
        def mlp(v):
            w1, b1 = sd[f"{p}.ChannelGate.mlp.1.weight"], sd[f"{p}.ChannelGate.mlp.1.bias"]
            w3, b3 = sd[f"{p}.ChannelGate.mlp.3.weight"], sd[f"{p}.ChannelGate.mlp.3.bias"]
            return F.linear(F.relu(F.linear(v, w1, b1)), w3, b3)

        size = t.shape[2:]
        avg = F.avg_pool2d(t, size).flatten(1)
        mx = F.max_pool2d(t, size).flatten(1)
        t = t * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
        pooled = torch.cat([t.max(dim=1, keepdim=True)[0], t.mean(dim=1, keepdim=True)], dim=1)
        s = F.conv2d(pooled, sd[f"{p}.SpatialGate.spatial.conv.weight"], padding=3)
        return t * torch.sigmoid(bn(s, f"{p}.SpatialGate.spatial.bn"))

    kind, layers = DEPTHS[depth]
    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            n_convs = 3 if kind == "bottleneck" else 2
            out = x
            for j in range(1, n_convs + 1):
                w = sd[f"{p}.conv{j}.weight"]
                conv_stride = stride if j == (2 if kind == "bottleneck" else 1) else 1
                out = bn(
                    F.conv2d(out, w, stride=conv_stride, padding=w.shape[-1] // 2), f"{p}.bn{j}"
                )
                if j < n_convs:
                    out = F.relu(out)
            out = cbam_module(out, f"{p}.cbam")
            shortcut = x
            if f"{p}.downsample.0.weight" in sd:
                shortcut = bn(
                    F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1"
                )
            x = F.relu(out + shortcut)
    x = F.avg_pool2d(x, 7).flatten(1)
    return F.linear(x, sd["fc.weight"], sd["fc.bias"])


def our_name(official_key: str) -> str:
    """The mapping stated in the issue, written out independently of the loader."""
    key = official_key.removeprefix("module.")
    for theirs, ours in [
        (".cbam.ChannelGate.mlp.1.", ".attention.channel.mlp.0."),
        (".cbam.ChannelGate.mlp.3.", ".attention.channel.mlp.2."),
        (".cbam.SpatialGate.spatial.", ".attention.spatial."),
    ]:
        key = key.replace(theirs, ours)
    return key


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


@pytest.fixture(scope="module")
def official50():
    return official_state_dict(50, seed=1)


@pytest.fixture(scope="module")
def official50_file(official50, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "RESNET50_CBAM_new_name_wrap.pth"
    # PyTorch 0.4's format (the authors' environment), which torch.load still reads.
    torch.save(wrap_as_training_script(official50), path, _use_new_zipfile_serialization=False)
    return path


# --- the authors' checkpoint -------------------------------------------------------------------


def test_reference_shapes_match_the_paper_parameter_count():
    shapes = official_shapes(50)
    params = sum(
        math.prod(s) for k, s in shapes.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )  # fmt: skip
    assert round(params / 1e6, 2) == 28.09  # the paper's ResNet-50 + CBAM


def test_official_checkpoint_lands_tensor_by_tensor(official50, official50_file):
    model = create_model("resnet50", attention="cbam")
    report = load_official(model, official50_file)
    assert report.source == "official"
    assert report.loaded == len(official50)
    assert report.left_at_init == ()
    assert report.metadata["epoch"] == 100 and report.metadata["arch"] == "resnet"
    assert report.metadata["best_prec1"] == pytest.approx(77.622)
    ours = model.state_dict()
    assert len(ours) == len(official50)
    for key, value in official50.items():
        assert torch.equal(ours[our_name(key)], value), key
    # spot checks through the module tree, not the state dict
    block = model.layer3[5]
    assert torch.equal(
        block.attention.channel.mlp[2].bias,
        official50["module.layer3.5.cbam.ChannelGate.mlp.3.bias"],
    )
    assert torch.equal(
        block.attention.spatial.bn.running_var,
        official50["module.layer3.5.cbam.SpatialGate.spatial.bn.running_var"],
    )


def test_official_checkpoint_output_equals_an_independent_forward(official50, official50_file):
    model = create_model("resnet50", attention="cbam", checkpoint=official50_file).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
        expected = reference_forward(official50, x, 50)
    assert_close_relative(ours, expected)


def assert_close_relative(actual, expected):
    scale = expected.abs().max()
    assert scale > 1e-3 and expected.std() > 1e-3 * scale  # a non-degenerate output
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def test_basic_block_official_checkpoint(tmp_path):
    sd = official_state_dict(18, seed=18)
    path = tmp_path / "ckpt.pth.tar"
    torch.save(wrap_as_training_script(sd), path)  # the current zip format
    model = create_model("resnet18", attention="cbam", checkpoint=path).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert_close_relative(model(x), reference_forward(sd, x, 18))


def test_old_checkpoint_without_batch_counters_loads(tmp_path):
    sd = {k: v for k, v in official_state_dict(18).items() if "num_batches_tracked" not in k}
    model = create_model("resnet18", attention="cbam")
    report = load_official(model, sd)
    assert report.loaded == len(sd)
    assert torch.equal(model.layer1[0].attention.channel.mlp[0].weight,
                       sd["module.layer1.0.cbam.ChannelGate.mlp.1.weight"])  # fmt: skip


def test_official_weights_as_safetensors(tmp_path):
    sd = official_state_dict(18, seed=3)
    path = tmp_path / "resnet18_cbam.safetensors"
    safetensors.torch.save_file(sd, path)
    model = create_model("resnet18", attention="cbam")
    assert load_checkpoint(model, path).source == "official"  # recognised by its key names
    assert torch.equal(model.fc.weight, sd["module.fc.weight"])


def test_official_checkpoint_into_attached_torchvision_model(tmp_path):
    sd = official_state_dict(18, seed=4)
    tv_model = cbam.attach(torchvision.models.resnet18(), "cbam")
    load_official(tv_model, sd)
    ours = create_model("resnet18", attention="cbam", checkpoint=sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv_model.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)


def test_convert_official_names():
    converted = convert_official(official_state_dict(18))
    assert "layer4.1.attention.spatial.bn.weight" in converted
    assert "layer1.0.attention.channel.mlp.2.bias" in converted
    assert not any(k.startswith("module.") or ".cbam." in k for k in converted)


# --- torchvision weights -----------------------------------------------------------------------


def randomise_bn(model, seed=0):
    """Give every BN non-trivial statistics, so equal outputs mean equal computations."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            with torch.no_grad():
                m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


@pytest.mark.parametrize(
    ("tv_name", "ours"), [("resnet50", "resnet50"), ("resnet18", "resnet18"),
                          ("resnext50_32x4d", "resnext50_32x4d")],
)  # fmt: skip
def test_torchvision_weights_give_torchvision_logits(tv_name, ours):
    tv_model = randomise_bn(getattr(torchvision.models, tv_name)()).eval()
    model = create_model(ours).eval()
    report = load_torchvision(model, tv_model.state_dict())
    assert report.left_at_init == ()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv_model(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_torchvision_wide_resnet_into_our_resnet_class():
    tv_model = randomise_bn(torchvision.models.wide_resnet50_2()).eval()
    model = cbam.models.ResNet(cbam.models.Bottleneck, [3, 4, 6, 3], width_per_group=128)
    load_torchvision(model, tv_model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tv_model(x), rtol=1e-5, atol=1e-5)


def test_torchvision_weights_into_cbam_model_leave_attention_at_init(tmp_path):
    tv_model = randomise_bn(torchvision.models.resnet18())
    path = tmp_path / "resnet18.pth"
    torch.save(tv_model.state_dict(), path)
    model = create_model("resnet18", attention="cbam")
    fresh_attention = {k: v.clone() for k, v in model.state_dict().items() if ".attention." in k}
    report = load_checkpoint(model, path)  # auto: no attention tensors in the file
    assert report.source == "torchvision"
    assert set(report.left_at_init) == {
        k for k in fresh_attention if not k.endswith("num_batches_tracked")
    }
    state = model.state_dict()
    for k, v in tv_model.state_dict().items():
        assert torch.equal(state[k], v), k
    for k, v in fresh_attention.items():
        assert torch.equal(state[k], v), k
    assert torch.all(model.layer2[1].attention.spatial.bn.weight == 0)  # the paper's init


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def model18():
    return create_model("resnet18", attention="cbam")


def test_checkpoint_for_another_architecture(official50_file, model18):
    before = snapshot(model18)
    with pytest.raises(CheckpointError) as info:
        load_official(model18, official50_file)
    message = str(info.value)
    assert "missing key(s): layer1.0.conv3.weight" not in message  # resnet18 has no conv3
    assert "unexpected key(s): module.layer1.0.conv3.weight" in message  # the file's own name
    assert "shape mismatch(es)" in message and "model [64, 64, 3, 3], checkpoint" in message
    assert "The checkpoint fits create_model('resnet50', attention='cbam')" in message
    assert "Nothing in the model was changed" in message
    assert_unchanged(model18, before)


def test_wrong_number_of_classes_says_so(model18):
    sd = official_state_dict(18)
    sd["module.fc.weight"] = sd["module.fc.weight"][:10]
    sd["module.fc.bias"] = sd["module.fc.bias"][:10]
    before = snapshot(model18)
    expected = r"module.fc.weight \(-> fc.weight\): model \[1000, 512\], checkpoint \[10, 512\]"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_official(model18, sd)
    assert "num_classes=10" in str(info.value)
    assert_unchanged(model18, before)


def test_partial_attention_is_an_error_not_a_backbone_load(model18):
    sd = create_model("resnet18", attention="cbam").state_dict()
    del sd["layer2.0.attention.spatial.conv.weight"]
    before = snapshot(model18)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): layer2.0.attention.spatial"):
        load_checkpoint(model18, sd)
    assert_unchanged(model18, before)


def _truncated(path, data):
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "text", "random", "empty"])
def test_broken_files_are_clear_errors(kind, tmp_path, model18):
    sd = model18.state_dict()
    if kind == "zip":
        torch.save(sd, tmp_path / "full.pth")
        path = _truncated(tmp_path / "cut.pth", (tmp_path / "full.pth").read_bytes())
        expected = "truncated"
    elif kind == "legacy":
        torch.save(sd, tmp_path / "full.pth", _use_new_zipfile_serialization=False)
        path = _truncated(tmp_path / "cut.pth.tar", (tmp_path / "full.pth").read_bytes())
        expected = "truncated"
    elif kind == "safetensors":
        safetensors.torch.save_file(sd, tmp_path / "full.safetensors")
        path = _truncated(
            tmp_path / "cut.safetensors", (tmp_path / "full.safetensors").read_bytes()
        )
        expected = "truncated or corrupt"
    elif kind == "text":
        path = tmp_path / "notes.pth"
        path.write_text("epoch 90, top-1 77.6\n")
        expected = "is not a checkpoint"
    elif kind == "random":
        path = tmp_path / "noise.pth"
        path.write_bytes(b"\x80" + os.urandom(4096))
        expected = "truncated or is not a PyTorch checkpoint"
    else:
        path = tmp_path / "empty.pth"
        path.write_bytes(b"")
        expected = "empty file"
    before = snapshot(model18)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(model18, path)
    assert_unchanged(model18, before)


class _RunsCode:
    """Unpickling this calls Path.touch on a marker file: code execution, made visible."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(writer, tmp_path, model18):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": model18.state_dict(), "extra": _RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
        assert zipfile.is_zipfile(path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=4)
    before = snapshot(model18)
    with pytest.raises(CheckpointError) as info:
        create_model("resnet18", attention="cbam", checkpoint=path)
    with pytest.raises(CheckpointError):
        load_checkpoint(model18, path)
    message = str(info.value)
    assert "was refused" in message and "run code" in message
    assert "pathlib" in message or "getattr" in message  # names what it would have called
    assert "weights_only=False" in message and "safetensors" in message  # how to convert
    assert not marker.exists()
    assert_unchanged(model18, before)


def test_read_checkpoint_unwraps_and_strips_prefixes():
    sd = {"_orig_mod.fc.weight": torch.ones(2, 2)}
    ckpt = read_checkpoint({"model": sd, "epoch": 3, "args": {"lr": 0.1}})
    assert list(ckpt.state_dict) == ["fc.weight"]
    assert ckpt.metadata == {"epoch": 3}
    assert ckpt.original("fc.weight") == "_orig_mod.fc.weight"
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_checkpoint({"epoch": 3})
    with pytest.raises(CheckpointError, match="not tensors"):
        read_checkpoint({"fc.weight": torch.ones(1), "note": "hi"})
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint("/nonexistent/weights.pth")
