"""Networks: cylinder symmetry of the U-Net, shapes, attention through SDPA, sizes of the presets."""
import pytest
import torch
import torch.nn.functional as F

from calofast.config import get_preset
from calofast.geometry import PRESETS
from calofast.nn import build_network
from calofast.nn.layers import count_parameters

DS2 = PRESETS["ds2"]


def test_unet_is_equivariant_to_rotations_of_the_cylinder():
    """Circular padding: rotating the input by 4 alpha bins (two stride-2 levels) rotates the output."""
    torch.manual_seed(0)
    net = build_network(get_preset("tiny").network, DS2).eval()
    for p in net.parameters():                     # zero-initialised output layers would hide everything
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 45, 16, 9)
    c_noise, cond = torch.tensor([10.0, 500.0]), torch.tensor([[0.3], [-0.5]])
    with torch.no_grad():
        y = net(x, c_noise, cond)
        y_rot = net(torch.roll(x, 4, dims=3), c_noise, cond)
    torch.testing.assert_close(y_rot, torch.roll(y, 4, dims=3), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y, torch.roll(y, 4, dims=3))   # and the output is not trivially symmetric


@pytest.mark.parametrize("preset, grid", [("tiny", (45, 16, 9)), ("tiny-transformer", (45, 16, 9)),
                                          ("tiny-transformer", (45, 50, 18)), ("tiny", (45, 50, 18))])
def test_shapes(preset, grid):
    geo = PRESETS["ds2" if grid[1] == 16 else "ds3"]
    net = build_network(get_preset(preset).network, geo)
    y = net(torch.randn(2, 1, *grid), torch.tensor([1.0, 2.0]), torch.zeros(2, 1))
    assert y.shape == (2, 1, *grid)
    assert count_parameters(net) < 500_000


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for preset in ("tiny", "tiny-transformer"):
        net = build_network(get_preset(preset).network, DS2)
        net(torch.randn(1, 1, 45, 16, 9), torch.tensor([1.0]), torch.zeros(1, 1))
    assert len(calls) >= 3


def test_large_presets_are_large():
    assert count_parameters(build_network(get_preset("ds2-unet").network, DS2)) > 1_000_000
    assert count_parameters(build_network(get_preset("ds2-transformer").network, DS2)) > 5_000_000


def _randomised(net):
    for p in net.parameters():                     # zero-initialised layers would hide every dependence
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


def test_layer_conditioning_reaches_the_tokens_of_its_layers():
    """With layer_cond, changing one layer's value moves the output of that layer's tokens first: through the
    per-token embedding, even with the global embedding and attention mixing switched off."""
    cfg = get_preset("ds2-factorised").network
    torch.manual_seed(0)
    net = _randomised(build_network(cfg, DS2, cond_dim=46))
    with torch.no_grad():
        net.emb.cond_mlp[0].weight[:, 1:] = 0      # the global embedding ignores the layer values
        for block in net.blocks:                   # no attention mixing between tokens
            block.proj.weight.zero_()
            block.proj.bias.zero_()
    x, c_noise = torch.randn(1, 1, 45, 16, 9), torch.tensor([300.0])
    cond = torch.randn(1, 46)
    bumped = cond.clone()
    bumped[0, 1 + 7] += 1.0                        # layer 7: tokens of layers 6-8 (patch depth 3)
    with torch.no_grad():
        d = (net(x, c_noise, bumped) - net(x, c_noise, cond)).abs().sum((0, 1, 3, 4))
    assert (d[6:9] > 0).all() and d[:6].max() == 0 and d[9:].max() == 0


def test_factorised_presets():
    cfg = get_preset("ds2-factorised")
    shape_net = build_network(cfg.network, DS2, cond_dim=46)
    assert 5_000_000 < count_parameters(shape_net) < 9_000_000           # ~16 MB as fp16 with the energy MLP
    energy = build_network(cfg.energy.network, DS2, cond_dim=1, event_shape=(45,))
    assert count_parameters(energy) < 2_000_000
    y = _randomised(energy)(torch.randn(3, 45), torch.tensor([1.0, 500.0, 999.0]), torch.zeros(3, 1))
    assert y.shape == (3, 45) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="grid event shape"):
        build_network(cfg.network, DS2, event_shape=(45,))


def test_ds3_factorised_preset_builds_and_runs():
    """The DS3 configuration of the DS2 recipe: 450 tokens over the 45 x 50 x 18 grid, the same network size,
    a forward on a DS3 shower gives a DS3-shaped, finite output (the preset is untrained: issue 16)."""
    from calofast.geometry import PRESETS as GEOMETRIES
    cfg = get_preset("ds3-factorised")
    ds3 = GEOMETRIES["ds3"]
    net = build_network(cfg.network, ds3, cond_dim=1 + 45)
    assert net.tokens == (15, 5, 6) and 5_000_000 < count_parameters(net) < 9_000_000
    with torch.no_grad():
        y = _randomised(net)(torch.randn(1, 1, 45, 50, 18), torch.tensor([300.0]), torch.randn(1, 46))
    assert y.shape == (1, 1, 45, 50, 18) and torch.isfinite(y).all()
