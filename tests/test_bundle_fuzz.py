"""A bundle's metadata and bytes are data: every edit below (re-signed, so that only validation can catch it) and
every flipped byte is refused with one line, before anything is built or allocated (issue 17, item 7)."""
import json
import random

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calofast.checkpoint import _meta_sha256, load_bundle
from calofast.config import apply_overrides, get_preset
from calofast.train import train_model

from helpers import tiny_data, tiny_xml


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = apply_overrides(get_preset("tiny-factorised"), [f"geometry={tiny_xml(tmp)}", "train.showers=64",
                                                          "energy.train.showers=64"])
    path = train_model(cfg, tiny_data(tmp), tmp / "run")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return path, meta, load_file(str(path))


def _edit(meta, key, fn):
    return dict(meta, **{key: json.dumps(fn(json.loads(meta[key])))})


def _cfg(path, value):
    def fn(d):
        x = d
        for k in path[:-1]:
            x = x[k]
        x[path[-1]] = value
        return d
    return lambda m: _edit(m, "config", fn)


def _stages(**fields):
    return lambda m: _edit(m, "stages", lambda d: [dict(s, **fields) for s in d])


def _layers(fn):
    return lambda m: _edit(m, "geometry", lambda d: dict(d, name="edited", layers=[fn(l) for l in d["layers"]]))


CASES = {   # name: (edit of the metadata, words the one-line error must hold)
    "config a list": (lambda m: dict(m, config="[]"), "expected an object"),
    "config a number": (lambda m: dict(m, config="3"), "expected an object"),
    "config not JSON": (lambda m: dict(m, config="{"), "inconsistent"),
    "heads 0": (_cfg(["network", "heads"], 0), "network.heads"),
    "channels a string": (_cfg(["network", "channels"], "abc"), "network.channels"),
    "depth 10^9": (_cfg(["network", "depth"], 10 ** 9), "network.depth"),
    "width a float": (_cfg(["network", "width"], 64.5), "network.width"),
    "a bigger network than the weights": (_cfg(["network", "depth"], 7), "do not fit"),
    "a wider network than the weights": (_cfg(["network", "width"], 2048), "do not fit"),
    "T = 10^10": (_cfg(["diffusion", "timesteps"], 10 ** 10), "timesteps"),
    "10^6 angular bins": (_layers(lambda l: [l[0], l[1], 10 ** 6]), "invalid bins"),
    "NaN radius": (_layers(lambda l: [l[0], [float("nan")] + l[1][1:], l[2]]), "invalid bins"),
    "negative radius": (_layers(lambda l: [l[0], [-5.0] + l[1][1:], l[2]]), "invalid bins"),
    "geometry a list": (lambda m: dict(m, geometry="[1]"), "geometry"),
    "stages an object": (lambda m: dict(m, stages="{}"), "stage specs"),
    "10^6 sampler steps": (_stages(sampler={"name": "euler", "steps": 10 ** 6}), "1 to 10000 steps"),
    "steps a string": (_stages(sampler={"name": "euler", "steps": "2"}), "known sampler"),
    "unknown sampler": (_stages(sampler={"name": "bogus", "steps": 2}), "known sampler"),
    "steps 1 -> 3 on a 1-step grid": (_stages(sampler={"name": "euler", "steps": 3, "sigmas": [80.0, 0.0]}),
                                      "a grid of 1 steps"),
    "increasing sigma grid": (_stages(sampler={"name": "euler", "steps": 1, "sigmas": [0.0, 80.0]}), "decreasing"),
    "unknown parameterisation": (_stages(parameterisation={"kind": "zzz"}), "parameterisation"),
    "interval t_max 2": (_stages(interval={"t_max": 2.0, "max_steps": 8}), "interval"),
    "transform a number": (lambda m: dict(m, transform="5"), "transform"),
    "transform kind unknown": (lambda m: _edit(m, "transform", lambda d: dict(d, kind="zzz")), "inconsistent"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edited_metadata_is_refused_in_one_line(bundle, tmp_path, case):
    path, meta, tensors = bundle
    edit, words = CASES[case]
    edited = edit(dict(meta))
    edited["meta_sha256"] = _meta_sha256(edited)            # re-signed: the checksum cannot catch it
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata=edited)
    with pytest.raises(ValueError) as err:
        load_bundle(out)
    text = str(err.value)
    assert "\n" not in text and len(text) < 500 and str(out) in text and words in text, text


def test_flipped_bytes_are_refused(bundle, tmp_path):
    path, _, _ = bundle
    raw = path.read_bytes()
    rng = random.Random(17)
    for i in range(40):
        b = bytearray(raw)
        for _ in range(rng.choice((1, 3))):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        out = tmp_path / f"flip{i}.safetensors"
        out.write_bytes(bytes(b))
        with pytest.raises(ValueError) as err:
            load_bundle(out)
        assert "\n" not in str(err.value) and str(out) in str(err.value)
    assert load_bundle(path).stages                              # the untouched file still loads
