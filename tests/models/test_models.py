"""Every model option composes, instantiates, runs forward/backward; structure checked against references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from torch import nn

from fqtrun.models import MODELS
from fqtrun.models.config import register_configs
from fqtrun.models.transformer import Attention, Patchify

CONF = Path(__file__).resolve().parents[2] / "conf"

# a small input each model accepts; torchvision nets need a larger image to survive 5 downsamplings
INPUTS = {"mlp": (40,), "cnn1d": (40,), "transformer": (40,), "resnet18": (3, 32, 32),
          "resnet50": (3, 64, 64), "mobilenet_v2": (3, 32, 32)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only contend on the shared 2-core machine (50x slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def compose_model(name: str, *overrides: str):
    register_configs(ConfigStore.instance())
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+model={name}", *overrides]).model


def build(name: str, input_shape, num_classes: int = 10, *overrides: str) -> nn.Module:
    """Compose conf/model/<name>.yaml and instantiate it as the trainer does; unwrap Hydra's exception."""
    try:
        return instantiate(compose_model(name, *overrides), num_classes=num_classes, input_shape=input_shape)
    except InstantiationException as exc:
        raise exc.__cause__ from None


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_backward(model: nn.Module, shape, num_classes: int) -> None:
    torch.manual_seed(0)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_every_model_has_a_yaml():
    assert sorted(p.stem for p in (CONF / "model").glob("*.yaml")) == sorted(MODELS)


@pytest.mark.parametrize("name", [m for m in MODELS if m not in ("gpt", "llama")])  # LMs: test_gpt/test_llama.py
def test_every_model_forward_backward(name):
    shape = INPUTS.get(name, (3, 8, 8))  # CIFAR ResNets run at any size; 8x8 keeps this fast
    torch.manual_seed(0)
    forward_backward(build(name, shape, num_classes=7), shape, 7)


@pytest.mark.parametrize("name,shape", [("cnn1d", (2, 40)), ("transformer", (3, 10)),
                                        ("transformer", (1, 8, 8)), ("resnet20", (1, 8, 8)),
                                        ("mlp", (1, 8, 8)), ("preact_resnet56", (3, 9, 7)),
                                        ("resnet18", (1, 16, 16)), ("mobilenet_v2", (1, 16, 16))])
def test_other_input_shapes(name, shape):
    forward_backward(build(name, shape, 5), shape, 5)


def test_misspelt_setting_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_model("resnet20", "model.dpeth=32")
    with pytest.raises(ConfigCompositionException):
        compose_model("mlp", "model.hidden=abc")


@pytest.mark.parametrize("name,overrides,shape,needle", [
    ("resnet20", ["model.depth=21"], (3, 8, 8), "model.depth=21"),
    ("resnet20", ["model.shortcut=C"], (3, 8, 8), "model.shortcut"),
    ("resnet20", [], (40,), "input_shape"),
    ("transformer", ["model.heads=3"], (40,), "model.heads=3"),
    ("cnn1d", [], (3, 8, 8), "input_shape"),
    ("resnet18", ["model.arch=vgg"], (3, 8, 8), "model.arch"),
])
def test_bad_settings_raise_a_one_line_value_error(name, overrides, shape, needle):
    with pytest.raises(ValueError) as e:
        build(name, shape, 10, *overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cnn1d_is_the_papers_network():
    model = build("cnn1d", (40,))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (1, 25, 5, 2, 1), (25, 25, 3, 2, 1), (25, 25, 3, 2, 1)]
    # lengths 40 -> 19 -> 10 -> 5, so the head sees 25 * 5 = 125 features (paper's linear_in)
    assert model.head.in_features == 125
    assert n_params(model) == (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)


def resnet_a_params(depth: int, cin: int, classes: int) -> int:
    """Closed form for option A: stem conv+BN, 2 (conv+BN) per block, no shortcut weights, FC."""
    n, total, width = (depth - 2) // 6, cin * 16 * 9 + 2 * 16, 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += width * w * 9 + w * w * 9 + 4 * w
            width = w
    return total + 64 * classes + classes


@pytest.mark.parametrize("depth,published_m", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnet_parameter_counts(depth, published_m):
    model = build(f"resnet{depth}", (3, 32, 32))
    assert n_params(model) == resnet_a_params(depth, 3, 10)
    # He et al. 2016, Table 6 (CIFAR-10 parameter counts, rounded)
    assert round(n_params(model) / 1e6, 2 if depth < 100 else 1) == published_m


def test_resnet_option_b_adds_projections():
    a, b = build("resnet20", (3, 8, 8)), build("resnet20", (3, 8, 8), 10, "model.shortcut=B")
    # two downsampling blocks get a 1x1 conv + BN: 16->32 and 32->64
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    forward_backward(b, (3, 8, 8), 10)


def test_torchvision_stem_is_adapted_to_the_input_channels():
    model = build("resnet18", (1, 16, 16), 4)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 4
    assert build("mobilenet_v2", (2, 16, 16), 4).features[0][0].in_channels == 2


def test_transformer_uses_explicit_linears_only():
    model = build("transformer", (40,), 10, "model.depth=3")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 * 6 + 2  # q, k, v, out, fc1, fc2 per block; embedding; head


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 16, 4
    ours, ref = Attention(dim, heads), nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.k.weight, ours.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.k.bias, ours.v.bias]))
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
    x = torch.randn(3, 5, dim)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,patch", [((10,), 4), ((3, 12), 4), ((2, 6, 5), 3)])
def test_patchify_matches_a_slow_loop(shape, patch):
    x = torch.randn(2, *shape)
    tokens = Patchify(shape, patch)(x)
    xs = x.unsqueeze(1) if len(shape) == 1 else x
    if len(shape) <= 2:  # pad the length to a multiple of patch, token t = channels x positions
        length = -(-xs.shape[-1] // patch) * patch
        xs = torch.nn.functional.pad(xs, (0, length - xs.shape[-1]))
        ref = [xs[:, :, t * patch:(t + 1) * patch].reshape(2, -1) for t in range(length // patch)]
    else:
        h, w = (-(-s // patch) * patch for s in shape[1:])
        xs = torch.nn.functional.pad(xs, (0, w - shape[2], 0, h - shape[1]))
        ref = [xs[:, :, i:i + patch, j:j + patch].reshape(2, -1)
               for i in range(0, h, patch) for j in range(0, w, patch)]
    torch.testing.assert_close(tokens, torch.stack(ref, dim=1), atol=0, rtol=0)
