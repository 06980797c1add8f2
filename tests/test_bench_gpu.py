"""bench/gpu_cost.py (FLOPs by dtype, memory model on the meta device) and bench/gpu_check.py (the GPU check) on the
tiny models, so neither rots while no GPU runs them."""
import dataclasses
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu_check  # noqa: E402
import gpu_cost as C  # noqa: E402

MiB = 2**20


def traced(fn):
    """Run fn() under the meta emulation and the cost mode, as one step; return the step record."""
    emu, mode = C.MetaCuda(), C.CostMode("meta")
    mode.scanned = True  # nothing made before matters here (and the scan of all objects takes ~0.5 s)
    with C.meta_autocast_patch(emu), emu, mode:
        mode.begin(False)
        fn()
        mode.end()
    return mode.steps[0], mode


def test_matmul_flops_by_compute_dtype():
    B, n_in, n_out = 4, 8, 16
    x, w = torch.randn(B, n_in, device="meta"), torch.randn(n_out, n_in, device="meta", requires_grad=True)
    gemm = 2 * B * n_in * n_out
    rec, _ = traced(lambda: F.linear(x, w))
    assert rec["flops"] == {"fp32": gemm}

    def bf16_fwd_bwd():
        with torch.autocast("meta", dtype=torch.bfloat16):
            y = F.linear(x, w)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()

    with pytest.raises(RuntimeError):  # without the emulation, meta has no autocast
        torch.autocast("meta", dtype=torch.bfloat16).__enter__()
    rec, _ = traced(bf16_fwd_bwd)
    assert rec["flops"] == {"bf16": 2 * gemm}  # forward + weight gradient (x needs none)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert traced(lambda: F.linear(x, w))[0]["flops"] == {"tf32": gemm}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_grouped_convolution_backward_is_twice_its_forward():
    """torch's flop_registry ignores groups in a convolution's weight gradient (16x a forward on SANA); we do not."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64, device="meta")
    x = torch.randn(2, 64, 16, 16, device="meta", requires_grad=True)
    flags = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # torch's default (the GAD files switch it off for fp32 differences)
    try:
        fwd, _ = traced(lambda: conv(x))
        bwd, _ = traced(lambda: conv(x).sum().backward())
    finally:
        torch.backends.cudnn.allow_tf32 = flags
    forward = 2 * 2 * 64 * 16 * 16 * 9  # 2 FLOPs x batch x channels x pixels x 3x3 taps (one input channel each)
    assert fwd["flops"] == {"tf32": forward}  # fp32 convolutions: cuDNN's TF32 is on by default
    assert bwd["flops"] == {"tf32": 3 * forward}


def test_autocast_fp32_list_and_disabled_region():
    x = torch.randn(2, 8, device="meta")

    def f():
        with torch.autocast("meta", dtype=torch.bfloat16):
            h = F.linear(x, torch.randn(8, 8, device="meta"))
            assert F.layer_norm(h, (8,)).dtype == torch.float32  # CUDA autocast runs layer_norm in fp32
            with torch.autocast("meta", enabled=False):
                assert F.linear(x, torch.randn(8, 8, device="meta")).dtype == torch.float32

    rec, _ = traced(f)
    assert set(rec["flops"]) == {"bf16", "fp32"}


def test_fused_attention_same_flops_as_math_and_no_n_by_n_matrix():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, N, d = 2, 4, 256, 16
    q = torch.randn(B, H, N, d, device="meta", dtype=torch.bfloat16)
    fused, _ = traced(lambda: F.scaled_dot_product_attention(q, q, q))

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            F.scaled_dot_product_attention(q, q, q)

    plain, _ = traced(math)
    assert fused["flops"] == {"attn_bf16": 4 * B * H * N * N * d}
    # the math kernel upcasts half-precision q, k, v to fp32 (unless allow_fp16_bf16_reduction_math_sdp), on CUDA too
    assert plain["flops"] == {"fp32": 4 * B * H * N * N * d}
    nn_matrix = B * H * N * N * 4  # bytes of one fp32 score matrix
    assert plain["peak"] - plain["start_bytes"] >= nn_matrix > fused["peak"] - fused["start_bytes"]


def test_peak_memory_follows_frees():
    def f():
        a = torch.empty(4 * MiB, dtype=torch.uint8, device="meta")
        b = torch.empty(2 * MiB, dtype=torch.uint8, device="meta")
        del a
        c = torch.empty(3 * MiB, dtype=torch.uint8, device="meta")
        return b, c

    rec, mode = traced(f)
    assert rec["peak"] - rec["start_bytes"] == 6 * MiB  # a + b; c comes after a is freed


def test_data_dependent_reads_get_plausible_answers():
    def f():
        t = torch.randn(3, device="meta")
        assert bool(torch.isfinite(t).all()) and t.sum().item() == 1.0
        assert torch.equal(t.cpu(), torch.zeros(3))

    _, mode = traced(f)
    assert mode.scalar_reads == {"torch.bool": 1, "torch.float32": 1}


def test_gad_sid_step_costs_on_meta():
    """The real gad_sid --bench step on the tiny SANA, on meta: fp32 finite differences add fp32 GEMMs and time."""
    r = C.run_file("sid", "tiny", "a", batch=2, pairs=1)
    base, gad = r["base"], r["gad"]
    assert base["flops"].get("fp32", 0) == 0 < gad["flops"]["fp32"]  # base: all GEMMs under bf16 autocast
    assert gad["flops"]["bf16"] == base["flops"]["bf16"]  # a pair shares its draws; GAD adds the fp32 forwards only
    assert C.seconds(gad, False) > 1.5 * C.seconds(base, False)
    assert gad["peak"] >= base["peak"] > base["start_bytes"] > 0
    @dataclasses.dataclass
    class Args:  # a method file that cannot choose the JVP's precision
        gad_jvp: str = "fd"

    assert C.overrides(types.SimpleNamespace(Args=Args, __name__="old"), "b") == "old has no --gad-fp32"


def test_gpu_check_small_on_cpu(tmp_path):
    res = gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path)])
    assert [r["file"] for r in res["bench"]] == ["tdm", "sid", "ladd"]
    assert all(r["batch"] == 2 and r["ratio"] > 0.5 for r in res["bench"])
    cos = {(r["file"], r["config"]): r["cos"] for r in res["response"]}
    assert len(cos) == 9 and all(cos[(f, "c")] > 0.999999 for f in ("tdm", "sid", "ladd"))  # fp32 JVP vs fp64 JVP
    assert all(0.999 < cos[(f, c)] < cos[(f, "c")] for f in ("tdm", "sid", "ladd") for c in "ab")
    assert [r["fits"] for r in res["fit"]] == ["yes", "yes"]
    assert "| gad_sid |" in (tmp_path / "gpu_check.md").read_text()
