"""Training: loss falls, CLI and config, bundles, kill-and-resume, 2-process DDP on CPU (gloo)."""
import json
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from calofast.checkpoint import load_bundle
from calofast.cli import main
from calofast.config import apply_overrides, get_preset
from calofast.generate import sample_batch
from calofast.train import train_model

from helpers import tiny_data, tiny_xml

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp, *extra):
    return apply_overrides(get_preset("tiny"), [f"geometry={tiny_xml(tmp)}", *extra])


def _per_event_loss(denoiser, x0, cond, seed):
    """Per-event denoising loss with fixed sigma and noise draws (paired between models)."""
    param = denoiser.param
    g = torch.Generator().manual_seed(seed)
    sigma = param.sample_sigma(x0.shape[0], g, "cpu")
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        d = denoiser(x0 + sigma.reshape(-1, 1, 1, 1, 1) * noise, sigma, cond)
    w = param.loss_weight(sigma) / param.scalings(sigma)[1] ** 2
    return (w.reshape(-1, 1, 1, 1, 1) * (d - x0) ** 2).flatten(1).mean(1)


def test_tiny_training_loss_falls(tmp_path):
    """Held-out loss of the trained EMA model vs the same network at initialisation (paired draws)."""
    from calofast.diffusion import Preconditioned
    from calofast.nn import build_network
    from calofast.train import load_training_data

    data = tiny_data(tmp_path)
    cfg = _cfg(tmp_path, "train.showers=6000", "train.log_showers=1000", "train.checkpoint_showers=6000")
    bundle = load_bundle(train_model(cfg, data, tmp_path / "run"))
    torch.manual_seed(cfg.train.seed)                  # train_model's initialisation
    init = Preconditioned(build_network(cfg.network, bundle.geometry), bundle.denoiser.param).eval()
    x0, cond = load_training_data(tiny_data(tmp_path, n=2048, seed=1), bundle.transform)[-1]
    diff = _per_event_loss(init, x0, cond, 5) - _per_event_loss(bundle.denoiser, x0, cond, 5)
    assert float(diff.mean()) > 5 * float(diff.std()) / len(diff) ** 0.5, (float(diff.mean()), float(diff.std()))
    stats = [json.loads(l) for l in (tmp_path / "run/stats.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "run/config.json").read_text())["train"]["showers"] == 6000
    assert bundle.meta["train_events_seen"] == str(stats[-1]["showers"]) and bundle.meta["format"] == "calofast/2"
    assert json.loads(bundle.meta["data"])[0]["sha256"] and bundle.meta["git_commit"]
    peaks = [r["peak_host_mib"] for r in stats]          # the process's peak: recorded, positive, never falling
    assert peaks[0] > 0 and peaks == sorted(peaks) and "peak_gpu_mib" not in stats[0]


def test_bundle_roundtrip_gives_identical_samples(tmp_path):
    data = tiny_data(tmp_path)
    bundle_path = train_model(_cfg(tmp_path, "train.showers=256"), data, tmp_path / "run")
    a, b = load_bundle(bundle_path), load_bundle(bundle_path)
    e = torch.tensor([2e3, 5e4, 9e4])
    for sampler in ("ddim", "ddpm", "heun"):
        x, nfe, _ = sample_batch(a, e, 3, range(3), sampler=sampler, steps=6)
        y, _, _ = sample_batch(b, e, 3, range(3), sampler=sampler, steps=6)
        assert torch.equal(x, y) and nfe == {"shower": 11 if sampler == "heun" else 6}
        assert torch.isfinite(x).all() and (x >= 0).all()


def test_corrupt_and_tampered_bundles(tmp_path):
    data = tiny_data(tmp_path)
    path = train_model(_cfg(tmp_path, "train.showers=64"), data, tmp_path / "run")
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_bundle(tmp_path / "trunc.safetensors")
    flipped = bytearray(raw)
    flipped[-20] ^= 0x40                                  # inside the tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        load_bundle(tmp_path / "flip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="not a readable"):
        load_bundle(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no such model bundle"):
        load_bundle(tmp_path / "none.safetensors")
    # Metadata holds everything, and no pickle: safetensors only.
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert {"config", "stages", "transform", "geometry", "calofast_version", "tensors_sha256", "meta_sha256"} <= set(meta)
    # The metadata are covered by their own checksum: an edited config is refused.
    from safetensors.torch import load_file, save_file
    edited = dict(meta, config=meta["config"].replace('"depth": 6', '"depth": 7'))
    assert edited != meta
    save_file(load_file(str(path)), str(tmp_path / "meta.safetensors"), metadata=edited)
    with pytest.raises(ValueError, match="metadata checksum"):
        load_bundle(tmp_path / "meta.safetensors")


def test_cli_train_rejects_unknown_keys_and_saves_config(tmp_path, capsys):
    data = tiny_data(tmp_path)
    xml = tiny_xml(tmp_path)
    assert main(["train", "--data", str(data), "--preset", "tiny", "--set", "train.lrr=1", "-o", str(tmp_path / "r")]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--preset", "nope", "-o", str(tmp_path / "r")]) == 2
    assert main(["train", "--data", str(data), "--preset", "tiny", "--set", f"geometry={xml}",
                 "--set", "train.showers=64", "-o", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r/model.safetensors").exists() and (tmp_path / "r/config.json").exists()
    # Same folder, different config: refused rather than silently mixing runs.
    assert main(["train", "--data", str(data), "--preset", "tiny", "--set", f"geometry={xml}",
                 "--set", "train.showers=128", "--set", "train.lr=0.1", "-o", str(tmp_path / "r")]) == 2


def _train_cmd(data, xml, out, showers):
    return [sys.executable, "-m", "calofast", "train", "--data", str(data), "--preset", "tiny",
            "--set", f"geometry={xml}", "--set", f"train.showers={showers}", "--set", "train.checkpoint_showers=256",
            "--set", "train.log_showers=256", "-o", str(out)]


def test_sigkill_and_resume_continues_exactly(tmp_path):
    data, xml = tiny_data(tmp_path), tiny_xml(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    showers = 4096
    ref = subprocess.run(_train_cmd(data, xml, tmp_path / "ref", showers), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(_train_cmd(data, xml, tmp_path / "run", showers), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run/state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shown = torch.load(state, weights_only=True)["shown"]
    assert 0 < shown < showers, "killed too late to test resuming"
    again = subprocess.run(_train_cmd(data, xml, tmp_path / "run", showers), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = load_bundle(tmp_path / "ref/model.safetensors"), load_bundle(tmp_path / "run/model.safetensors")
    for (k, x), (_, y) in zip(a.denoiser.net.state_dict().items(), b.denoiser.net.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
    assert b.meta["train_events_seen"] == str(showers)
    logged = [json.loads(l)["showers"] for l in (tmp_path / "run/stats.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)), logged          # each step recorded once across the kill


def test_resume_drops_records_past_the_checkpoint(tmp_path):
    """Records written after the last checkpoint (and a half-written line) go: the resumed run writes them again."""
    from calofast.train import _trim_stats
    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps({"step": k, "showers": 64 * k}) + "\n" for k in range(1, 6)) + '{"step": 6, "sho')
    _trim_stats(path, 192)
    assert [json.loads(l)["showers"] for l in path.read_text().splitlines()] == [64, 128, 192]


def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    xml = tiny_xml(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           str(REPO / "tests/ddp_worker.py"), str(tmp_path), str(xml)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    start = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for part in ("model", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    stats = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["showers"] == 320 and start


def test_torchrun_cli_train(tmp_path):
    data, xml = tiny_data(tmp_path), tiny_xml(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
           "-m", "calofast", "train", "--data", str(data), "--preset", "tiny", "--set", f"geometry={xml}",
           "--set", "train.showers=256", "-o", str(tmp_path / "run")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_bundle(tmp_path / "run/model.safetensors").meta["train_events_seen"] == "256"


def test_diverging_training_stops_with_one_line_and_writes_no_bundle(tmp_path, capsys):
    """A finite but absurd learning rate blows the weights up: the loop refuses to log or checkpoint a
    non-finite loss, so no bundle with non-finite weights appears."""
    args = ["train", "--data", str(tiny_data(tmp_path)), "--preset", "tiny", "--set", f"geometry={tiny_xml(tmp_path)}",
            "--set", "train.lr=1e30", "--set", "train.showers=4096", "--set", "train.warmup_showers=0",
            "--set", "train.log_showers=256", "-o", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("calofast: error:")]
    assert len(errors) == 1 and "training loss is" in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "run/model.safetensors").exists()


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_damaged_resume_state_is_refused_in_one_line(tmp_path, capsys):
    """A truncated, hostile (pickled object) or foreign state.pt: exit 2, one line naming the file and how to start
    afresh; nothing in it is executed, and the bundle beside it is untouched."""
    import pickle
    data, xml = tiny_data(tmp_path), tiny_xml(tmp_path)
    cmd = ["train", "--data", str(data), "--preset", "tiny", "--set", f"geometry={xml}", "--set", "train.showers=64",
           "-o", str(tmp_path / "r")]
    assert main(cmd) == 0
    state, bundle = tmp_path / "r/state.pt", tmp_path / "r/model.safetensors"
    raw, kept = state.read_bytes(), bundle.read_bytes()
    damaged = {"truncated": lambda: state.write_bytes(raw[:5000]),
               "hostile": lambda: state.write_bytes(pickle.dumps({"model": _Hostile()})),
               "a list": lambda: torch.save([1, 2], state),
               "counts as text": lambda: torch.save({"shown": "many", "step": 1}, state),
               "no optimiser": lambda: torch.save({k: v for k, v in torch.load(io.BytesIO(raw), weights_only=True).items()
                                                   if k != "opt"}, state)}
    for name, make in damaged.items():
        make()
        capsys.readouterr()
        assert main(cmd) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(state) in err and "afresh" in err and "weights_only" not in err, (name, err)
        assert bundle.read_bytes() == kept
