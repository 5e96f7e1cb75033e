"""`attach` on 1-D and 3-D networks: torchvision's video ResNets (residual placement) and S3D
(stage placement), and a user's own Conv1d / Conv3d residual networks: 1-D / 3-D CBAM at
every site, an exact identity at attach time (identity_init=True), and trainable after."""

import copy

import pytest
import torch
from torch import nn

import cbam
from cbam import IdentityBlend

torchvision = pytest.importorskip("torchvision")


class Block(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))), with the add in forward, in 1-D or 3-D."""

    def __init__(self, channels: int, dims: int) -> None:
        super().__init__()
        conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
        self.conv1, self.bn1 = conv(channels, channels, 3, padding=1, bias=False), bn(channels)
        self.conv2, self.bn2 = conv(channels, channels, 3, padding=1, bias=False), bn(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class UserNet(nn.Module):
    """A small residual classifier for N x 2 x L signals (dims=1) or N x 2 x D x H x W
    volumes (dims=3)."""

    def __init__(self, dims: int, classes: int = 3) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
        self.stem = conv(2, 16, 3, padding=1)
        self.blocks = nn.Sequential(Block(16, dims), Block(16, dims))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(torch.relu(self.stem(x)))
        return self.head(features.mean(dim=list(range(2, features.dim()))))


def check_identity_then_trains(model: nn.Module, x: torch.Tensor, sites: int, dims: int,
                               **attach_kwargs) -> None:  # fmt: skip
    model.eval()
    with torch.no_grad():
        before = model(x)
    attached = cbam.attach(copy.deepcopy(model), "cbam", identity_init=True, **attach_kwargs)
    layers = [m for m in attached.modules() if isinstance(m, cbam.CBAM)]
    assert len(layers) == sites
    assert all(m.spatial_dims == dims for m in layers)
    with torch.no_grad():
        assert torch.equal(attached.eval()(x), before)  # bit for bit at attach time
    # trainable: a step moves the blends' alphas off 0 and the outputs with them
    attached.train()
    optimizer = torch.optim.SGD(attached.parameters(), lr=0.5)
    labels = torch.arange(x.shape[0]) % before.shape[1]
    torch.nn.functional.cross_entropy(attached(x), labels).backward()
    alphas = [m.alpha for m in attached.modules() if isinstance(m, IdentityBlend)]
    assert len(alphas) == sites and all(a.grad is not None and a.grad != 0 for a in alphas)
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(attached.eval()(x), before)


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_video_resnets(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models.video, name)(num_classes=4)
    check_identity_then_trains(model, torch.randn(2, 3, 8, 48, 48), sites=8, dims=3)


@pytest.mark.slow
def test_s3d_at_stage_placement():
    """S3D has no residual adds: one CBAM per stage output (its head needs 224 px)."""
    torch.manual_seed(0)
    model = torchvision.models.video.s3d(num_classes=4)
    check_identity_then_trains(
        model, torch.randn(2, 3, 16, 224, 224), sites=6, dims=3, placement="stage"
    )


def test_s3d_sites_are_its_stages():
    """The same plan as the slow test above, read without training: six 3-D stage sites."""
    report = cbam.attach_report(torchvision.models.video.s3d(), "cbam", placement="stage",
                                input_size=None)  # fmt: skip
    assert len(report.sites) == 6
    assert {s.spatial_dims for s in report.sites} == {3}
    assert {s.placement for s in report.sites} == {"stage"}


@pytest.mark.parametrize("dims, shape", [(1, (4, 2, 40)), (3, (4, 2, 6, 8, 8))])
def test_a_users_own_residual_network(dims, shape):
    torch.manual_seed(0)
    check_identity_then_trains(UserNet(dims), torch.randn(shape), sites=2, dims=dims)


def test_a_callable_without_spatial_dims_is_refused_on_3d():
    with pytest.raises(ValueError, match="must take spatial_dims=3"):
        cbam.attach(UserNet(3), lambda channels: cbam.CBAM(channels))
