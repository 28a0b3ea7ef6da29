"""Cost of the shortcut student's teacher-ODE targets (`calofast.distill.shortcut.TeacherTargets.pairs`): one
batch of trajectories of a bundle's main stage, eager and compiled, bf16, median of repeats, beside one
forward of the same network at the training batch size (what a training step costs about three of).

    python benchmarks/bench_teacher_targets.py --model ds2-factorised --trajectories 64 256
"""
import argparse

import torch
from bench_network import timed as timed_s          # benchmarks/ is the script's folder, on sys.path

from calofast.checkpoint import load_bundle
from calofast.distill.shortcut import TeacherTargets


def timed(fn, reps: int) -> float:
    """Median ms of `reps` synchronised calls after a warm-up."""
    return timed_s(fn, reps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ds2-factorised")
    ap.add_argument("--trajectories", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024, help="training batch of the forward comparison")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    b = load_bundle(a.model, "cuda")
    den = b.denoiser
    t_max = 160.0 / 161.0
    shape, c_dim = b.event_shape, b.transform.cond_dims[-1]
    print(f"{a.model}: {torch.cuda.get_device_name()}, bf16, Heun {a.steps} steps + level points")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = torch.randn(a.batch, *shape, device="cuda")
        cond, sig = torch.zeros(a.batch, c_dim, device="cuda"), torch.full((a.batch,), 1.0, device="cuda")
        with torch.no_grad():
            f = timed(lambda: den(x, sig, cond), a.reps)
        print(f"one forward at batch {a.batch}: {f:.2f} ms")
        for compiled in (False, True):
            tt = TeacherTargets.of(den, compiled, t_max=t_max, fraction=0.1, steps=a.steps)
            for n in a.trajectories:
                x0, c = torch.randn(n, *shape, device="cuda"), torch.zeros(n, c_dim, device="cuda")
                ms = timed(lambda: tt.pairs(x0, c, torch.randn_like(x0)), a.reps)
                print(f"{'compiled' if compiled else 'eager':>8} {n:5d} trajectories ({len(tt.grid()[0]) - 1} steps): "
                      f"{ms:8.2f} ms = {ms / f:.1f} forwards at batch {a.batch}")


if __name__ == "__main__":
    main()
