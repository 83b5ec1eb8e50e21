"""The N:M mask policy of sparse training: layers, refresh, SR-STE (spec sparsity.md, "Training with masks")."""

import pytest
import torch
from torch import nn

from fqtrun.sparsity.policy import MaskPolicy


class MaskedLinear(nn.Linear):
    """Minimal layer following the sparsity contract; the real QuantLinear / QuantConv in
    fqtrun/quant/layers.py follow the same one: a `weight_mask` bool buffer (None = dense)
    and a forward on w + (w * mask - w).detach() (masked forward, straight-through backward)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_mask", None)

    def forward(self, x):
        w = self.weight
        if self.weight_mask is not None:
            w = w + (w * self.weight_mask - w).detach()
        return nn.functional.linear(x, w, self.bias)


class MaskedConv2d(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_mask = None  # a plain attribute: the policy must still register a buffer

    def forward(self, x):
        w = self.weight
        if self.weight_mask is not None:
            w = w + (w * self.weight_mask - w).detach()
        return self._conv_forward(x, w, self.bias)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        MaskedLinear(16, 32), nn.ReLU(), MaskedLinear(32, 24), nn.ReLU(), MaskedLinear(24, 4)
    )


def _groups_ok(mask, n, m, kind):
    if kind == "nm":
        return bool((mask.reshape(-1, m).sum(1) == n).all())
    r, c = mask.shape[0] // m, mask.shape[1] // m
    b = mask.reshape(r, m, c, m).permute(0, 2, 1, 3)
    return bool((b.sum(2) == n).all() and (b.sum(3) == n).all())


@pytest.mark.parametrize(
    "kind,n,m", [("nm", 2, 4), ("transposable", 2, 4), ("transposable", 4, 8), ("nm", 1, 4)]
)
def test_density_stays_n_over_m_after_every_refresh(kind, n, m):
    # The reference never passed N on its 2:4 path, so masks went dense after the first refresh.
    model = _mlp()
    policy = MaskPolicy(kind, n, m, every=3)
    names = policy.attach(model)
    assert names == ["0", "2"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    previous = None
    refreshes = 0
    for step in range(12):
        refreshed = policy.maybe_refresh(model, step)
        assert refreshed == (step % 3 == 0)
        refreshes += refreshed
        for name, density in policy.densities(model).items():
            assert density == n / m, (step, name)
            assert _groups_ok(model.get_submodule(name).weight_mask, n, m, kind)
        x, y = torch.randn(32, 16, generator=gen), torch.randint(0, 4, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if refreshed:
            masks = [model.get_submodule(nm).weight_mask.clone() for nm in names]
            if previous is not None:
                assert any(not torch.equal(a, b) for a, b in zip(masks, previous))  # masks follow the weights
            previous = masks
    assert refreshes == 4


def test_masks_follow_current_weights():
    model = _mlp()
    policy = MaskPolicy("nm", 2, 4)
    policy.attach(model)
    layer = model[0]
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(1)))
    policy.refresh(model)
    assert torch.equal(layer.weight_mask, policy.mask_for(layer.weight))


def test_pruned_weights_get_straight_through_gradients():
    model = _mlp()
    policy = MaskPolicy("transposable", 2, 4)
    policy.attach(model)
    layer = model[2]
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    out = layer(x)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(gy)
    mask = layer.weight_mask
    # forward used the masked weight
    torch.testing.assert_close(out, x @ (layer.weight * mask).T + layer.bias)
    # backward: dL/dW = gy^T x for ALL weights, pruned ones included (straight-through)
    torch.testing.assert_close(layer.weight.grad, gy.T @ x)
    assert (layer.weight.grad[~mask] != 0).all()


def test_srste_adds_decay_only_on_pruned_weights():
    model = _mlp()
    policy = MaskPolicy("nm", 2, 4, srste_decay=0.25)
    policy.attach(model)
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    before = {n: model.get_submodule(n).weight.grad.clone() for n in policy.names}
    classifier_grad = model[4].weight.grad.clone()
    policy.apply_srste(model)
    for name in policy.names:
        layer = model.get_submodule(name)
        delta = layer.weight.grad - before[name]
        mask = layer.weight_mask
        assert torch.equal(delta[mask], torch.zeros_like(delta[mask]))
        torch.testing.assert_close(delta[~mask], 0.25 * layer.weight.detach()[~mask])
    assert torch.equal(model[4].weight.grad, classifier_grad)


def test_srste_off_changes_nothing():
    model = _mlp()
    policy = MaskPolicy("nm", 2, 4)
    policy.attach(model)
    model(torch.randn(4, 16)).sum().backward()
    before = model[0].weight.grad.clone()
    policy.apply_srste(model)
    assert torch.equal(model[0].weight.grad, before)


def test_classifier_stays_dense_unless_asked():
    model = _mlp()
    assert MaskPolicy("nm", 2, 4).attach(model) == ["0", "2"]
    assert model[4].weight_mask is None
    model = _mlp()
    assert MaskPolicy("nm", 2, 4, keep_last=False).attach(model) == ["0", "2", "4"]
    assert model[4].weight_mask is not None


def test_exclude_patterns_and_densities():
    model = _mlp()
    policy = MaskPolicy("nm", 1, 4, exclude=["2"])
    assert policy.attach(model) == ["0"]
    assert policy.densities(model) == {"0": 0.25}
    assert model[2].weight_mask is None


def test_conv_layer_and_plain_attribute_become_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 8, 5, 5))
    policy = MaskPolicy("transposable", 2, 4)
    assert policy.attach(model) == ["0"]
    conv = model[0]
    assert "weight_mask" in conv._buffers and "0.weight_mask" in model.state_dict()
    view = conv.weight_mask.permute(0, 2, 3, 1).reshape(8, -1)  # groups along input channels
    assert _groups_ok(view, 2, 4, "transposable")


def test_refusals():
    with pytest.raises(ValueError, match="no layer can take a mask"):
        MaskPolicy("nm", 2, 4).attach(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="no layer can take a mask"):
        MaskPolicy("nm", 2, 4, exclude=["*"]).attach(_mlp())
    with pytest.raises(ValueError, match="sparsity.kind"):
        MaskPolicy("block", 2, 4)
    with pytest.raises(ValueError, match="sparsity.method"):
        MaskPolicy("transposable", 2, 4, method="best")
    with pytest.raises(ValueError, match="sparsity.every"):
        MaskPolicy("nm", 2, 4, every=0)
    with pytest.raises(ValueError, match="sparsity.srste_decay"):
        MaskPolicy("nm", 2, 4, srste_decay=-1.0)
    with pytest.raises(ValueError, match="sparsity.n"):
        MaskPolicy("nm", 4, 4)
