"""DeepCache on a small patch transformer: every schedule computes exactly what it says (full calls the plain
network, cached calls the reused deep residual), it resets between sampler runs, and it is refused where it
cannot apply."""
import pytest
import torch

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.config import apply_overrides, get_preset
from calofast.deepcache import DeepCache, deep_cache, parse_deep_cache
from calofast.generate import sample_batch
from calofast.nn import UNet3D
from calofast.train import train_model

from helpers import awake_transformer, tiny_data, tiny_xml


def _net():
    return awake_transformer(4)


def _call(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 3, 4, 3, generator=g), torch.rand(n, generator=g) * 1000, torch.rand(n, 1, generator=g)


def test_interval_one_is_the_plain_network():
    net = _net()
    cached = DeepCache(net, keep=2, interval=1)
    with torch.no_grad():
        for seed in range(4):
            x, c, cond = _call(seed=seed)
            torch.testing.assert_close(cached(x, c, cond), net(x, c, cond), rtol=1e-6, atol=1e-6)
    assert cached.full_calls == 4


def test_cached_calls_reuse_the_deep_residual_of_the_last_full_call():
    net = _net()
    cached = DeepCache(net, keep=1, full=(0, 2))
    inputs = [_call(seed=s) for s in range(4)]
    with torch.no_grad():
        outs = [cached(*a) for a in inputs]
        for k, (x, c, cond) in enumerate(inputs):
            h, emb = net.stem(x, c, cond)
            h = net.blocks_range(h, emb, 0, 1)
            src = inputs[0 if k < 2 else 2]                    # the last full call
            h0, e0 = net.stem(*src)
            h0 = net.blocks_range(h0, e0, 0, 1)
            delta = net.blocks_range(h0, e0, 1, 4) - h0
            torch.testing.assert_close(outs[k], net.output(h + delta, emb), rtol=1e-5, atol=1e-5)
        assert torch.equal(outs[0], cached.__class__(net, 1, 1)(*inputs[0]))   # call 0 is always full
    assert cached.full_calls == 2 and cached.calls == 4
    assert not torch.allclose(outs[1], net(*inputs[1]), atol=1e-3)             # a cached call is an approximation
    cached.reset()
    assert (cached.calls, cached.full_calls, cached.delta) == (0, 0, None)


@pytest.fixture(scope="module")
def factorised(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dc")
    cfg = apply_overrides(get_preset("tiny-factorised"), [f"geometry={tiny_xml(tmp)}", "network.depth=3"])
    return train_model(cfg, tiny_data(tmp), tmp / "run")


def test_sampler_runs_reset_the_cache_and_count_full_calls(factorised):
    b = deep_cache(load_bundle(factorised), keep=1, interval=2)
    e = torch.tensor([2e3, 4e4], dtype=torch.float64)
    first, nfe, clipped = sample_batch(b, e, 3, range(2), sampler="euler", steps=5)
    cache = b.denoiser.net
    assert nfe == {"energy": 7, "shape": 5} and cache.full_calls == 3 and not clipped.any()   # calls 0, 2, 4
    again, _, _ = sample_batch(b, e, 3, range(2), sampler="euler", steps=5)
    assert torch.equal(first, again)                                  # reset before each run
    plain, _, _ = sample_batch(load_bundle(factorised), e, 3, range(2), sampler="euler", steps=5)
    every, _, _ = sample_batch(deep_cache(load_bundle(factorised), 1, 1), e, 3, range(2), sampler="euler", steps=5)
    torch.testing.assert_close(every, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))


def test_bad_settings_are_refused(factorised, tmp_path, capsys):
    with pytest.raises(ValueError, match="keep=4"):
        DeepCache(_net(), keep=4)
    with pytest.raises(ValueError, match="transformer"):
        DeepCache(UNet3D((8, 16), 1, (), 2, 16, 1), keep=1)
    assert parse_deep_cache("3:2") == (3, 2, None) and parse_deep_cache("2:0,3,1") == (2, 1, (0, 1, 3))
    for bad in ("3", "a:2", "3:", "3:1,x"):
        with pytest.raises(ValueError, match="KEEP:INTERVAL"):
            parse_deep_cache(bad)
    assert main(["generate", "--model", str(factorised), "--n", "2", "--deep-cache", "9:2", "-o", str(tmp_path / "g.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keep=9" in err and not (tmp_path / "g.h5").exists()
