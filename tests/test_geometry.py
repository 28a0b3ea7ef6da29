import math

import numpy as np
import pytest
import torch

from calofast.geometry import PRESETS, get_geometry, geometry_for_voxels, parse_binning_xml

from conftest import reference_dir

OFFICIAL = {"ds1-photons": "binning_dataset_1_photons.xml", "ds1-pions": "binning_dataset_1_pions.xml",
            "ds2": "binning_dataset_2.xml", "ds3": "binning_dataset_3.xml"}


def test_voxel_counts():
    assert [PRESETS[k].n_voxels for k in OFFICIAL] == [368, 533, 6480, 40500]
    assert PRESETS["ds2"].grid_shape == (45, 16, 9) and PRESETS["ds3"].grid_shape == (45, 50, 18)
    assert not PRESETS["ds1-pions"].is_regular
    assert geometry_for_voxels(533) is PRESETS["ds1-pions"]
    with pytest.raises(ValueError, match="no built-in geometry"):
        geometry_for_voxels(100)


def test_ds1_layout_matches_spec():
    g = PRESETS["ds1-photons"]
    offs = g.layer_offsets
    assert [offs[i] for i in (0, 1, 2, 3, 12)] == [0, 8, 168, 358, 363] and offs[-1] == 368
    assert g.relevant_layers == [0, 1, 2, 3, 12] and g.alpha_layers == [1, 2]
    pions = PRESETS["ds1-pions"]
    assert [pions.layer_offsets[i] for i in (12, 13, 14)] == [213, 363, 523]
    with pytest.raises(ValueError, match="irregular"):
        pions.grid_shape


@pytest.mark.skipif(reference_dir() is None, reason="official binning XMLs not found (set CALOFAST_REFERENCE_DIR)")
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_xml_equals_preset(name):
    path = reference_dir() / OFFICIAL[name]
    parsed = parse_binning_xml(path)
    assert parsed.layers == PRESETS[name].layers
    assert parsed.particle == PRESETS[name].particle
    assert get_geometry(path) is PRESETS[name]


def _write_xml(path, geometry):
    lines = ["<Bins>", f'  <Bin pid="11" name="{geometry.particle}">']
    for layer in geometry.layers:
        edges = ",".join(repr(e) for e in layer.r_edges) or "0"
        lines.append(f'    <Layer id="{layer.id}" r_edges="{edges}" n_bin_alpha="{layer.n_alpha}"/>')
    path.write_text("\n".join(lines + ["  </Bin>", "</Bins>"]))


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_xml_roundtrip_of_presets(tmp_path, name):
    _write_xml(tmp_path / "b.xml", PRESETS[name])
    assert parse_binning_xml(tmp_path / "b.xml").layers == PRESETS[name].layers


HOSTILE = {
    "billion_laughs": """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<Bins><Bin name="electron"><Layer id="0" r_edges="0,1" n_bin_alpha="&lol3;"/></Bin></Bins>""",
    "external_entity": """<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Bins><Bin name="electron"><Layer id="0" r_edges="0,1" n_bin_alpha="&xxe;"/></Bin></Bins>""",
    "dtd_only": """<?xml version="1.0"?><!DOCTYPE Bins SYSTEM "http://example.org/x.dtd">
<Bins><Bin name="electron"><Layer id="0" r_edges="0,1" n_bin_alpha="1"/></Bin></Bins>""",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_xml_is_refused(tmp_path, kind):
    p = tmp_path / "evil.xml"
    p.write_text(HOSTILE[kind])
    with pytest.raises(ValueError, match="refused unsafe XML"):
        parse_binning_xml(p)


@pytest.mark.parametrize("text, match", [
    ("<Bins><Bin name='electron'><Layer id='0' r_edges='0,a' n_bin_alpha='1'/></Bin></Bins>", "malformed"),
    ("<Bins><Bin name='electron'><Layer id='0' r_edges='0,2,1' n_bin_alpha='1'/></Bin></Bins>", "invalid bins"),
    ("<Bins><Bin name='electron'><Layer id='0' r_edges='0,nan,3' n_bin_alpha='1'/></Bin></Bins>", "invalid bins"),
    ("<Bins><Bin name='electron'><Layer id='0' r_edges='0,2,inf' n_bin_alpha='1'/></Bin></Bins>", "invalid bins"),
    ("<Bins><Bin name='electron'><Layer id='0' r_edges='-4,2,3' n_bin_alpha='1'/></Bin></Bins>", "invalid bins"),
    ("<Bins><Bin name='electron'><Layer id='0' r_edges='0,2' n_bin_alpha='0'/></Bin></Bins>", "invalid bins"),
    ("<Bins><Bin name='electron'><Layer id='0' r_edges='0,2' n_bin_alpha='1000000'/></Bin></Bins>", "invalid bins"),
    ("<Bins><Bin name='electron'><Layer id='0' r_edges='0' n_bin_alpha='1'/></Bin></Bins>", "0 voxels"),
    ("<Other/>", "expected <Bins>"),
    ("<Bins><Bin", "not a well-formed"),
])
def test_malformed_xml(tmp_path, text, match):
    p = tmp_path / "bad.xml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        parse_binning_xml(p)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_flat_index_roundtrip(name):
    g = PRESETS[name]
    idx = g.voxel_index
    assert idx.shape == (g.n_voxels, 3)
    np.testing.assert_array_equal(g.flat_index(idx[:, 0], idx[:, 1], idx[:, 2]), np.arange(g.n_voxels))
    with pytest.raises(ValueError):
        g.flat_index([g.relevant_layers[0]], [0], [999])


def test_grid_layout_and_centres():
    g = PRESETS["ds2"]
    flat = torch.arange(2 * g.n_voxels, dtype=torch.float32).reshape(2, -1)
    grid = g.to_grid(flat)
    assert grid.shape == (2, 1, 45, 16, 9)
    # Radial bin is fastest, then alpha, then layer (CaloChallenge README).
    assert grid[0, 0, 1, 2, 3] == 1 * 144 + 2 * 9 + 3
    assert torch.equal(g.to_flat(grid), flat)
    assert g.voxel_r[0] == pytest.approx(2.325) and g.voxel_r[8] == pytest.approx(39.525)
    assert g.voxel_alpha[0] == pytest.approx(-math.pi + math.pi / 16)
    assert g.voxel_alpha[9] == pytest.approx(-math.pi + 3 * math.pi / 16)
    v = 4 * 9 + 2    # alpha bin 4, radial bin 2 in layer 0
    assert g.voxel_x[v] == pytest.approx(g.voxel_r[v] * math.cos(g.voxel_alpha[v]))
    assert g.voxel_y[v] == pytest.approx(g.voxel_r[v] * math.sin(g.voxel_alpha[v]))


@pytest.mark.parametrize("name", ["ds2", "ds3"])
def test_par04_order_roundtrip_and_one_hot(name):
    g = PRESETS[name]
    L, A, R = g.grid_shape
    rng = np.random.default_rng(0)
    x = rng.random((3, g.n_voxels)).astype(np.float32)
    np.testing.assert_array_equal(g.from_par04(g.to_par04(x)), x)
    t = torch.from_numpy(x)
    assert torch.equal(g.from_par04(g.to_par04(t)), t)
    # One voxel (layer iz, alpha ia, radius ir) lands in Par04 cell p = (ir * N_phi + ia) * N_z + iz.
    iz, ia, ir = 7, 3, 5
    one = np.zeros((1, g.n_voxels), np.float32)
    one[0, (iz * A + ia) * R + ir] = 1.0
    assert np.flatnonzero(g.to_par04(one)) == [(ir * A + ia) * L + iz]


def test_get_geometry_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown geometry"):
        get_geometry("ds9")
    with pytest.raises(ValueError, match="no such binning file"):
        get_geometry(tmp_path / "missing.xml")
