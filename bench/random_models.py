"""The `--model random` models: sizes on the meta device, and a CPU check of the random denoisers.

  python bench/random_models.py sizes            # parameters and checkpoint weights of every component
  python bench/random_models.py cpu pixart 16    # build the denoiser in fp32 on the CPU, forward at a 16x16 latent

The CPU check reports the build time, the time of a second forward (batch 1, 8 random text tokens, timestep 500),
the output's std, how much the output moves between two random inputs, and any all-zero weight matrix (a
zero-initialised output layer would make the map constant).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

SETS = [("sd21", "random"), ("pixart", "random"), ("sana", "random"), ("sd3", "random-sd35m"),
        ("sd3", "random-sd3m"), ("sdxl", "random")]
TEXT_WIDTH = {"pixart": 4096, "sana": 2304, "sd21": 1024}


def weights(m: torch.nn.Module) -> int:
    """Parameters (tied ones once) plus persistent buffers: what a checkpoint stores."""
    tied = {n for n, _ in m.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in m.parameters()) + sum(t.numel() for k, t in m.state_dict().items() if k not in tied)


def sizes() -> None:
    print("| set | component | class | parameters | checkpoint weights |\n|---|---|---|---|---|")
    for family, model in SETS:
        pipe = common.load_pipeline(family, model, torch.bfloat16, device="meta")
        for name, m in pipe.components.items():
            if isinstance(m, torch.nn.Module):
                n = sum(p.numel() for p in m.parameters())
                print(f"| {common.random_variant(family, model)} | {name} | {type(m).__name__} | {n / 1e6:.2f}M | "
                      f"{weights(m) / 1e6:.2f}M |", flush=True)


@torch.no_grad()
def cpu(family: str, side: int) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    net = common.random_denoiser(family).eval()
    build = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, net.config.in_channels, side, side, generator=g)
    kw = {"encoder_hidden_states": torch.randn(1, 8, TEXT_WIDTH[family], generator=g)}
    if family == "pixart":
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    f = lambda z: net(z[None], timestep=torch.tensor([500.0]), **kw).sample[0]  # noqa: E731
    f(x[0])  # first call: one-off kernel setup
    t0 = time.perf_counter()
    y = f(x[0])
    forward = time.perf_counter() - t0
    y2 = f(x[1])
    zeros = [n for n, p in net.named_parameters() if p.dim() > 1 and not p.any()]
    print(f"| {family} | {build:.1f} s | {forward:.2f} s | {y.std():.3f} | {(y - y2).norm() / y.norm():.2f} | "
          f"{'finite' if torch.isfinite(y).all() else 'NOT FINITE'} | {zeros or 'none'} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["sizes"]:
        sizes()
    elif sys.argv[1:2] == ["cpu"] and len(sys.argv) == 4:
        cpu(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
