"""How accurate is each way of computing GAD's response at a family's real depth and width? (README: Cost on a GPU)

On the real-size random denoiser (common.random_denoiser) at a reduced latent, batch 1, each estimate of
J v (the response to a move h v, divided by h) is compared with a float64 forward-mode JVP of the same network:
  fp32 difference at h (the --gad-jvp fd route), bf16-autocast differences at h and 10 h (what a user who switches the
  fd route to half precision gets), the bf16-autocast JVP (the default on CUDA), and the JVP with bf16 weights.
Usage: python bench/response_accuracy.py [pixart sana sd21]   (CPU; ~1-3 min per family on 2 cores)
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

H = {"pixart": 1e-2, "sana": 1e-2, "sd21": 1e-4}  # each family's h (GAD Table 11)
SHAPE = {"pixart": (1, 4, 8, 8), "sana": (1, 32, 4, 4), "sd21": (1, 4, 8, 8)}
TEXT = {"pixart": (120, 4096), "sana": (300, 2304), "sd21": (77, 1024)}


def network_map(family, g):
    """The denoiser's raw output as a function of its input, at a fixed timestep and random text embeddings."""
    emb = torch.randn(1, *TEXT[family], generator=g) * 0.1
    kw = {"pixart": {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}}.get(family, {})
    t = torch.tensor([600.0])

    def f(net, y):
        dt = next(net.parameters()).dtype
        return net(y.to(dt) if dt == torch.float64 else y, timestep=t, encoder_hidden_states=emb.to(
            torch.float64 if dt == torch.float64 else torch.float32), return_dict=False, **kw)[0][:, :SHAPE[family][1]]
    return f


def measure(family) -> dict:
    """{estimate name: cosine and relative error against a float64 JVP} for one family."""
    bf16 = lambda: torch.autocast("cpu", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    net = common.random_denoiser(family).eval().requires_grad_(False)
    x, v = torch.randn(SHAPE[family], generator=g), torch.randn(SHAPE[family], generator=g)
    f, h = network_map(family, g), H[family]
    fd = lambda hh: (f(net, x + hh * v).float() - f(net, x).float()) / hh
    jvp = lambda m, cast=lambda y: y: common.jvp_pair(lambda y: f(m, cast(y)), x, v)[1]
    with torch.no_grad():
        rows = {f"fp32 difference, h = {h:g}": fd(h)}
        with bf16():
            rows[f"bf16 autocast difference, h = {h:g}"] = fd(h)
            rows[f"bf16 autocast difference, h = {10 * h:g}"] = fd(10 * h)
            rows["bf16 autocast JVP (jvp_pair; the CUDA default)"] = jvp(net)
        rows["fp32 JVP (jvp_pair; --gad-fp32)"] = jvp(net)
        rows["bf16 weights JVP (jvp_pair)"] = jvp(copy.deepcopy(net).to(torch.bfloat16), lambda y: y.bfloat16())
        net64 = copy.deepcopy(net).double()
        ref = common.jvp_pair(lambda y: f(net64, y), x.double(), v.double())[1].double().flatten()
    out = {}
    for name, est in rows.items():
        e = est.double().flatten()
        out[name] = (torch.nn.functional.cosine_similarity(e, ref, dim=0).item(), ((e - ref).norm() / ref.norm()).item())
    return out


def main(families):
    print("| family | h | estimate of J v | cosine with float64 JVP | relative error |")
    print("|---|---|---|---|---|")
    for family in families:
        for name, (cos, rel) in measure(family).items():
            print(f"| {family} | {H[family]:g} | {name} | {cos:.5f} | {rel:.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["pixart", "sana", "sd21"])
