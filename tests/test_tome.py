"""Token merging on a small patch transformer: merge and unmerge do what ToMe says (kept tokens untouched, merged
ones averaged into their best match and copied back), ratio 0 is the plain network exactly, the option runs
through the samplers, the CLI and study plans, and bad ratios are refused in one line."""
import pytest
import torch

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.config import apply_overrides, get_preset
from calofast.generate import sample_batch
from calofast.tome import bipartite_merge, model_side, parse_tome, token_merging
from calofast.train import train_model

from helpers import awake_transformer, tiny_data, tiny_xml


def test_merge_averages_the_best_matches_and_unmerge_copies_back():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 5, generator=g)              # 5 destinations (even), 4 sources (odd)
    x[:, 3] = x[:, 4] + 1e-3 * torch.randn(3, 5, generator=g)   # source 3 nearly equals destination 4
    merge, unmerge = bipartite_merge(x, 1)
    y = merge(x)
    assert y.shape == (3, 8, 5)
    back = unmerge(y)
    # Source 3 went into destination 4 (its best match): both now hold their mean; every other token is untouched.
    mean = (x[:, 3] + x[:, 4]) / 2
    torch.testing.assert_close(back[:, 3], mean)
    torch.testing.assert_close(back[:, 4], mean)
    keep = [i for i in range(9) if i not in (3, 4)]
    assert torch.equal(back[:, keep], x[:, keep])
    merge0, unmerge0 = bipartite_merge(x, 0)
    assert torch.equal(unmerge0(merge0(x)), x)
    merge_all, _ = bipartite_merge(x, 99)               # capped at the number of sources
    assert merge_all(x).shape == (3, 5, 5)


def _net():
    return awake_transformer(3)


def test_ratio_zero_is_the_plain_network_and_merging_changes_little_at_first():
    net = _net()
    g = torch.Generator().manual_seed(1)
    x, c, cond = torch.randn(4, 1, 3, 4, 3, generator=g), torch.rand(4, generator=g) * 1000, torch.rand(4, 1, generator=g)
    with torch.no_grad():
        plain = net(x, c, cond)
        net.tome = 0.0
        assert torch.equal(net(x, c, cond), plain)
        net.tome = 0.25
        merged = net(x, c, cond)
    assert merged.shape == plain.shape and torch.isfinite(merged).all() and not torch.equal(merged, plain)


@pytest.fixture(scope="module")
def factorised(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tome")
    cfg = apply_overrides(get_preset("tiny-factorised"), [f"geometry={tiny_xml(tmp)}", "network.depth=2"])
    return train_model(cfg, tiny_data(tmp), tmp / "run")


def test_through_the_sampler_cli_and_plan_checks(factorised, tmp_path, capsys):
    e = torch.tensor([2e3, 4e4], dtype=torch.float64)
    plain, nfe, _ = sample_batch(load_bundle(factorised), e, 3, range(2), sampler="euler", steps=3)
    zero, _, _ = sample_batch(token_merging(load_bundle(factorised), 0.0), e, 3, range(2), sampler="euler", steps=3)
    assert torch.equal(zero, plain)
    b = model_side(load_bundle(factorised), "", 0.5)
    assert b.stages[-1].denoiser.net.tome == 0.5
    merged, nfe2, clipped = sample_batch(b, e, 3, range(2), sampler="euler", steps=3)
    assert nfe2 == nfe and torch.isfinite(merged).all() and not clipped.any()
    assert parse_tome(None) == 0.0 and parse_tome("0.3") == 0.3
    for bad in ("-0.1", "0.6", "x", "nan"):
        with pytest.raises(ValueError, match="merge ratio"):
            parse_tome(bad)
    assert main(["generate", "--model", str(factorised), "--n", "2", "--tome", "0.7", "-o", str(tmp_path / "g.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tome" in err and not (tmp_path / "g.h5").exists()
    assert main(["generate", "--model", str(factorised), "--n", "2", "--tome", "0.25", "-o", str(tmp_path / "g.h5")]) == 0
    plan = tmp_path / "p.toml"
    plan.write_text(f'[reference]\nn = 60\n[[rows]]\nlabel = "a"\nmodel = "{factorised}"\ntome = 0.9\n')
    from calofast.study_plan import load_plan
    with pytest.raises(ValueError, match="p.toml: row 'a'.*merge ratio|p.toml.*tome"):
        load_plan(plan)
    plan.write_text(f'[reference]\nn = 60\n[[rows]]\nlabel = "a"\nmodel = "{factorised}"\ntome = 0.25\n')
    assert load_plan(plan).rows[0].tome == 0.25
