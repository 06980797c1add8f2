"""GAD's response estimate at each family's real depth and width (the real-size random denoisers of --model random),
by the code path and in the dtype that CUDA runs by default: each file's own response function, forward-mode JVP
under bf16 autocast over fp32 weights. The reference is PyTorch's own forward-mode AD (torch.func.jvp, attention by
the math kernel: nothing of common.jvp_pair) of the same network in fp32 without autocast (CPUs have no TF32): exact
to fp32 rounding (bench/response_accuracy.py finds fp32 JVPs at cosine 1.00000 with float64 ones for all three
families; a float64 reference here cost ~35 s more, converting a 0.9B network to float64 and back).
Reduced resolution (16 image tokens), 8 text tokens and batch 1 keep this short on a CPU; depth and width are the
real ones."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import common
import gad_ladd
import gad_sid
import gad_tdm

H = 1e-2  # PixArt and SANA's h (Table 11); LADD's h = 1e-4 below
L = 8  # text tokens (the pipelines use 120 / 300 / 77; the text path carries no tangent, and it dominated the time)


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matrix multiply (the FLOPs that set a GPU's speed)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                   torch.ops.aten.convolution):
            self.seen.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


BF16 = lambda: common.autocast(torch.device("cpu"), torch.bfloat16)  # the step's autocast under --dtype auto on CUDA


def _pixart(net, x, v, g):
    """gad_tdm's teacher response: CFG x0 at tau, cond and uncond in one forward (train()'s f_T), in responses()."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64), 0).float()  # PixArt's betas
    emb = torch.randn(2, L, 4096, generator=g) * 0.1
    cond = lambda i, dt: {"encoder_hidden_states": emb[i:i + 1].to(dt), "encoder_attention_mask": torch.ones(1, L),
                          "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    tau = torch.tensor([600])
    f = lambda m, y, n=1, dt=torch.float32: gad_tdm.teacher_x0(m, y, tau.repeat(n), common.cat(*[cond(0, dt)] * n),
                                                               common.cat(*[cond(1, dt)] * n), 4.5, abar)[0]
    with BF16():  # train() calls responses() inside the step's autocast
        est = gad_tdm.responses(lambda y, n: f(net, y, n), x, v, H, "exact")[1]
    return est, lambda m, y: f(m, y)


def _sana(net, x, v, g):
    """gad_sid's teacher response: CFG x0 at sigma, gad_delta() as generator_update() calls it."""
    emb = torch.randn(2, L, 2304, generator=g) * 0.1
    cond = lambda i, dt: {"encoder_hidden_states": emb[i:i + 1].to(dt), "encoder_attention_mask": torch.ones(1, L)}
    sigma = torch.tensor([0.6])
    est = gad_sid.gad_delta(net, x, sigma, v, H, "exact", cond(0, torch.float32), cond(1, torch.float32), 4.5, BF16())
    return est, lambda m, y: gad_sid.x0_pred(m, y, sigma, cond(0, torch.float32), cond(1, torch.float32), 4.5)


def _sd21(net, x, v, g):
    """gad_ladd's student response h J v at z, student_pair() as g_step() calls it (with gradients)."""
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).float()
    emb = torch.randn(1, L, 1024, generator=g) * 0.1
    cond = lambda dt: {"encoder_hidden_states": emb.to(dt)}
    est = gad_ladd.student_pair(net, x, v, H, cond(torch.float32), abar, "epsilon", "exact", BF16())[1].detach()
    return est, lambda m, y: gad_ladd.student_x0(m, y, cond(torch.float32), abar, "epsilon")


@pytest.mark.parametrize("family,shape,response", [("pixart", (1, 4, 8, 8), _pixart), ("sana", (1, 32, 4, 4), _sana),
                                                   ("sd21", (1, 4, 8, 8), _sd21)])
def test_default_cuda_response_matches_an_fp32_jvp_at_real_depth_and_width(family, shape, response, random_denoiser,
                                                                             real_size_threads):
    net = random_denoiser(family)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    spy = MatmulDtypes()
    with spy:
        est, f = response(net, x, v, g)  # bf16 autocast inside, as under --dtype auto on CUDA
    assert spy.seen == {torch.bfloat16}  # the default runs every matmul in bf16
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the reference: torch's own JVP rules, fp32, no autocast
        ref = H * torch.func.jvp(lambda y: f(net, y), (x,), (v,))[1].double()
    cos = torch.nn.functional.cosine_similarity(est.flatten().double(), ref.flatten(), dim=0).item()
    print(f"{family}: cos {cos:.6f}, relative error {((est.double() - ref).norm() / ref.norm()).item():.4f}")
    assert cos >= 0.99


def test_the_defaults_are_bf16_jvps_on_cuda():
    for M in (gad_tdm, gad_sid, gad_ladd):
        a = M.Args()
        assert (a.gad_jvp, a.gad_fp32, a.dtype) == ("exact", False, "auto")
    assert common.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
