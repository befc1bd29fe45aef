"""ImageNet ResNets: torchvision parameter counts, unambiguous names, and (where torch is installed) the same logits
as a hand-written torchvision-layout PyTorch ResNet-50 whose state dict goes through ``jaxnoise convert-torch``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnoise import cli
from jaxnoise.models import get_model, load_torch_npz


@pytest.mark.parametrize("name, params", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                          ("resnet50", 25_557_032), ("resnet101", 44_549_160),
                                          ("resnet152", 60_192_808)])
def test_parameter_counts_are_torchvisions(name, params):
    model = get_model(name)
    assert model.name == name and model.param_count() == params


def test_resnet50_layout_and_resolution():
    model = get_model("resnet50", input_shape=(64, 64, 3), num_classes=7)
    variables = jax.eval_shape(model.init, jax.random.key(0))
    p = variables["params"]
    assert p["layer1"]["0"]["conv1"]["kernel"].shape == (1, 1, 64, 64)
    assert p["layer1"]["0"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert p["layer2"]["0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)      # stride on the 3x3 (v1.5)
    assert p["layer1"]["0"]["downsample"]["0"]["kernel"].shape == (1, 1, 64, 256)
    assert "downsample" not in p["layer1"]["1"] and p["fc"]["kernel"].shape == (2048, 7)
    assert len(model.sites) == 53 + 1   # 49 block convs + 4 projections + stem conv, and fc
    out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
    assert out[0].shape == (2, 7) and out[1]["layer4/2"].shape == (2, 2, 2, 2048)


def test_names_are_unambiguous():
    assert get_model("resnet50").config == {"num_classes": 1000} and get_model("resnet50").input_shape == (224, 224, 3)
    cifar50 = get_model("resnet50_cifar")
    assert cifar50.name == "resnet50_cifar" and cifar50.config["depth"] == 50 and cifar50.input_shape == (32, 32, 3)
    assert get_model("resnet20").name == "resnet20" and get_model("resnet20_cifar").name == "resnet20"
    assert get_model("resnet18_imagenet").name == "resnet18"
    with pytest.raises(ValueError, match="'resnet26' is ambiguous.*'resnet26_cifar'.*resnet18, resnet34, resnet50"):
        get_model("resnet26")
    with pytest.raises(ValueError, match="unknown model 'resnet20_imagenet'"):
        get_model("resnet20_imagenet")
    with pytest.raises(ValueError, match="unknown model 'resnet51_cifar'"):
        get_model("resnet51_cifar")


def test_convert_torch_without_torch_says_how_to_install(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *a, **k)

    (tmp_path / "w.pth").write_bytes(b"not read")
    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert cli.main(["convert-torch", str(tmp_path / "w.pth"), str(tmp_path / "w.npz")]) == 2
    err = capsys.readouterr().err
    assert "needs torch" in err and "pip install torch" in err and err.count("\n") == 1
    assert not (tmp_path / "w.npz").exists()


# --------------------------------------------------------------------------------------------------------------
# Against PyTorch (skipped where torch is not installed; torch is never a dependency)


def _torch_resnet50(num_classes):
    """torchvision.models.resnet50's layout, written out (torchvision need not be installed)."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or inplanes != planes * 4:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                                nn.BatchNorm2d(planes * 4))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inplanes = 64
            for i, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
                blocks = []
                for b in range(n):
                    blocks.append(Bottleneck(inplanes, planes, 2 if i > 1 and b == 0 else 1))
                    inplanes = planes * 4
                setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2048, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet50()


def test_resnet50_matches_pytorch_through_convert_torch(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = _torch_resnet50(1000)
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    with torch.no_grad():   # non-trivial BatchNorm statistics and affine terms
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    net.eval()
    pth = tmp_path / "r50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, pth)
    assert cli.main(["convert-torch", str(pth), str(tmp_path / "r50.npz"), "--model", "resnet50"]) == 0
    assert "checked against resnet50 (25,557,032 parameters)" in capsys.readouterr().out
    model = get_model("resnet50", input_shape=(64, 64, 3))
    variables = load_torch_npz(model, tmp_path / "r50.npz")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))).logits
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    # a file for another architecture is refused before anything is written
    assert cli.main(["convert-torch", str(pth), str(tmp_path / "r18.npz"), "--model", "resnet18"]) == 2
    assert "does not match model resnet18" in capsys.readouterr().err and not (tmp_path / "r18.npz").exists()
