"""gad_tdm.py on the tiny PixArt: equations against independent computations, gradient routing, GAD properties,
precision, smoke runs, export, exact resume (2-process runs: tests/test_distributed.py)."""
import copy
import dataclasses
import os

import pytest
import torch
from docs_call import documented_call, export_call_covers_documented

import common
import gad_tdm as M

TINY = dict(model="tiny", batch_size=2, sample_every=1000, ckpt_every=1000, eval_teacher_steps=4, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    pipe = common.load_pipeline("pixart", "tiny")
    teacher = pipe.transformer
    cond, uncond = common.encode(pipe, "pixart", ["a red fox", "a blue car"], "cpu")
    return pipe, teacher, cond, uncond, pipe.scheduler.alphas_cumprod.float()


def test_fake_loss_matches_independent_computation():
    abar = torch.linspace(0.9999, 0.01, 1000)
    torch.manual_seed(1)
    x0_f, x0_s, w = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.rand(3)
    tau = torch.tensor([10, 500, 990])
    snr = abar[tau] / (1 - abar[tau])
    expected = sum(((x0_f[i] - x0_s[i]) ** 2).mean() * min(snr[i].item(), 5.0) * w[i] for i in range(3)) / 3
    assert M.tdm_fake_loss(x0_f, x0_s, tau, w, abar, 5.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_generator_loss_value_and_gradient():
    torch.manual_seed(2)
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    T_cfg, F_x0, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), 1e-3
    loss = M.tdm_generator_loss(x0, T_cfg, F_x0, c)
    d = F_x0 - T_cfg  # x0 - target
    W = (x0.detach() - T_cfg).abs().mean((1, 2, 3), keepdim=True)
    expected = ((torch.sqrt(d**2 + c**2) - c) / W).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # the target is stop-gradient: d loss / d x0 = d / sqrt(d^2 + c^2) / W / numel
    assert torch.allclose(x0.grad, d / torch.sqrt(d**2 + c**2) / W / d.numel(), atol=1e-7)


def test_renoise_and_mixed_noise_are_consistent():
    """x_tau = alpha_tau x0 + sigma_tau m: the re-noised ODE point and the mixed noise describe the same sample."""
    abar = torch.linspace(0.9999, 0.005, 1000)
    torch.manual_seed(3)
    x0, eps_hat, noise = torch.randn(3, 2, 4, 4, dtype=torch.float64).unbind(0)
    t_mid, tau = torch.tensor([300, 100]), torch.tensor([600, 150])
    a_m, s_m = M.alpha_sigma(abar, t_mid)
    a_t, s_t = M.alpha_sigma(abar, tau)
    x_tau = M.renoise(a_m * x0 + s_m * eps_hat, t_mid, tau, noise, abar)
    m = M.mixed_noise(eps_hat, t_mid, tau, noise, abar)
    assert torch.allclose(x_tau, a_t * x0 + s_t * m, atol=1e-5)
    w = M.importance_weight(m, noise)
    assert torch.allclose(w, torch.exp(-0.5 * (m**2).flatten(1).mean(1)) / torch.exp(-0.5 * (noise**2).flatten(1).mean(1)))


def test_gad_surrogate_gradient_direction_agrees_with_the_tdm_gradient():
    """Eq. 9 in x0 space: grad_x_tau = (Delta_fake - Delta_real)/h / numel, which equals the change of the TDM
    generator's own descent direction (F - T) between x_tau + h v and x_tau: same sign convention as the base."""
    torch.manual_seed(4)
    A, Bm = torch.randn(16, 16), torch.randn(16, 16)
    T = lambda x: x @ A.T  # a "teacher" and a "fake" x0 map
    Fk = lambda x: x @ Bm.T
    x = torch.randn(2, 16, requires_grad=True)
    v, h = torch.randn(2, 16), 0.1
    d_T, d_F = T(x + h * v) - T(x), Fk(x + h * v) - Fk(x)
    sur, mismatch = M.gad_surrogate(x, d_F.detach(), d_T.detach(), h, "jvp", torch.ones(1))
    sur.backward()
    g_base = lambda y: Fk(y) - T(y)  # sign of d L_TDM / d x0 (descent moves x0 towards T - F)
    expected = (g_base(x + h * v) - g_base(x)).detach() / h / x.numel()
    assert torch.allclose(x.grad, expected, atol=1e-6)
    assert mismatch.item() == pytest.approx(((d_F - d_T) / h).pow(2).mean().item(), rel=1e-5)
    paper = M.gad_surrogate(x, d_F.detach(), d_T.detach(), h, "paper", torch.ones(1))[0]
    assert paper.item() == pytest.approx(h * sur.item(), rel=1e-5)  # printed form = h x jvp form


def test_eq9_through_x_tau_averages_out_over_v_but_the_response_path_does_not():
    """Linear teacher/fake x0 maps A, B (no curvature). Via x_tau (Eq. 9 as printed) the gradient is (B - A) v / numel:
    zero-mean over v ~ N(0, I), noise around nothing. Via the student's response W v (--gad-path response), the
    gradient on W is (B - A) v v^T / numel, whose mean is (B - A) / d: a real first-order push on the Jacobian."""
    torch.manual_seed(7)
    d, n, h = 8, 20000, 1e-2
    A, Bm = torch.randn(d, d), torch.randn(d, d)
    v = torch.randn(n, d)
    d_T, d_F = h * v @ A.T, h * v @ Bm.T
    x = torch.zeros(n, d, requires_grad=True)
    M.gad_surrogate(x, d_F, d_T, h, "jvp", torch.ones(1))[0].backward()
    per_draw, mean = x.grad.norm(dim=1).mean() * n, x.grad.mean(0).norm() * n
    assert mean < 0.03 * per_draw
    W = torch.zeros(d, d, requires_grad=True)
    d_S = h * v @ W.T
    M.gad_surrogate(d_S / h, d_F, d_T, h, "jvp", torch.ones(1))[0].backward()
    assert ((W.grad - (Bm - A) / d).norm() / ((Bm - A) / d).norm()).item() < 0.05


def _linear_student(d, seed):
    """S(x, t) = W x + t c: a student linear in x whose prediction depends on the noise level through c."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(d, d, generator=g) / d**0.5).requires_grad_(True)
    c = torch.randn(d, generator=g).requires_grad_(True)
    return (lambda x, t: x @ W.T + t * c), [W, c], g


def test_response_path_mean_gradient_over_directions_is_first_order_but_the_released_blocks_is_about_zero():
    """Issue 11: the released block ds = (S(x_tau + h v, tau) - x0_hat(x_{t_g}, t_g)) / h has its base at another input
    and noise level, so its per-draw gradient is the O(1)/h gap and its mean over directions v is about zero. The
    response path (matched base, x_tau detached, 1/2 MSE surrogate) has a clearly non-zero mean: a push on J_S."""
    d, h, n, tau, t_g = 6, 1e-2, 300, 0.6, 0.9
    S, params, g = _linear_student(d, 11)
    A, Bm = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)  # teacher and fake x0 Jacobians
    x_tg, noise = torch.randn(1, d, generator=g), torch.randn(1, d, generator=g)
    f = lambda y, n: S(y, tau)
    grads = {"response": [], "released": [], "gap": []}
    for v in torch.randn(n, 1, d, generator=g):
        d_T, d_F = h * v @ A.T, h * v @ Bm.T
        x0_hat = S(x_tg, t_g)
        x_tau = 0.8 * x0_hat + 0.6 * noise  # carries grad, as the re-noised student point does
        dS = {"response": M.student_response(f, x_tau, v, h, "fd", "jvp"),
              "released": (S(x_tau + h * v, tau) - x0_hat) / h,
              "gap": (S(x_tau, tau) - x0_hat) / h}  # the released block without its response
        for k, resp in dS.items():
            sur = M.gad_surrogate(resp, d_F, d_T, h, "jvp", torch.ones(1))[0]
            grads[k].append(torch.cat([p.flatten() for p in torch.autograd.grad(sur, params, retain_graph=True)]))
    ratio = {k: (torch.stack(v).mean(0).norm() / torch.stack(v).norm(dim=1).mean()).item() for k, v in grads.items()}
    assert ratio["response"] > 0.25 and ratio["released"] < 0.12, ratio  # 0.42 and 0.06 (noise floor 300^-1/2)
    cos = torch.nn.functional.cosine_similarity(torch.stack(grads["released"]), torch.stack(grads["gap"]), dim=1)
    assert cos.min() > 0.99  # the released gradient is the gap's, draw by draw


def test_response_path_detaches_x_tau_and_what_that_changes():
    """The response path takes S's response at sg(x_tau): the surrogate's weight gradient is the same as with x_tau
    attached, and nothing reaches x_tau. Attached (the released s_pert), x_tau would also get
    g . d(J_S v)/dx / numel, a second-order term in the student's curvature: for S = W tanh(x) it is
    (W^T g) * v * (-2 tanh(x) sech^2(x)) / numel, and for a student linear in x it is zero."""
    torch.manual_seed(3)
    d, h = 5, 1e-3  # responses() works in fp32
    W = torch.randn(d, d, requires_grad=True)
    x = torch.randn(2, d, requires_grad=True)
    v, d_T, d_F = (torch.randn(2, d) for _ in range(3))
    g = (d_F - d_T) / h
    for S, second in ((lambda y, n: torch.tanh(y) @ W.T, True), (lambda y, n: y @ W.T, False)):
        W.grad = x.grad = None
        M.gad_surrogate(M.student_response(S, x, v, h, "fd", "jvp"), d_F, d_T, h, "jvp", torch.ones(1))[0].backward()
        gW_detached = W.grad.clone()
        assert x.grad is None  # our choice: no gradient through x_tau
        W.grad = None
        M.gad_surrogate(M.responses(S, x, v, h, "fd")[1] / h, d_F, d_T, h, "jvp", torch.ones(1))[0].backward()
        assert torch.allclose(W.grad, gW_detached, rtol=1e-5, atol=1e-7)  # the Jacobian push is unchanged
        sech2 = 1 - torch.tanh(x.detach()) ** 2
        expected = (g @ W.detach()) * v * (-2 * torch.tanh(x.detach()) * sech2) / g.numel()
        if second:
            assert torch.allclose(x.grad, expected, rtol=2e-2, atol=1e-3 * expected.abs().max())
            assert x.grad.abs().max() > 1e-2
        else:
            assert x.grad.abs().max() < 1e-5 * gW_detached.abs().max()


def _f(net, cond, abar, tau, cfg=None, uncond=None):
    if cfg is None:
        return lambda x, n: M.predict(net, x, tau.repeat(n), common.cat(*[cond] * n), abar)[1]
    return lambda x, n: M.teacher_x0(net, x, tau.repeat(n), common.cat(*[cond] * n), common.cat(*[uncond] * n),
                                     cfg, abar)[0]


def test_gad_is_zero_when_fake_equals_teacher(tiny):
    pipe, teacher, cond, uncond, abar = tiny
    fake = copy.deepcopy(teacher)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    tau, v = torch.tensor([700, 300]), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        _, dT = M.responses(_f(teacher, cond, abar, tau, 1.0, uncond), x, v, 1e-2, "fd")  # CFG 1 = the cond net
        _, dF = M.responses(_f(fake, cond, abar, tau), x, v, 1e-2, "fd")
    sur, mismatch = M.gad_surrogate(x, dF, dT, 1e-2, "jvp", torch.ones(1))
    sur.backward()
    # zero up to fp32 rounding (the teacher's batch holds cond and uncond, the fake's does not)
    assert x.grad.abs().max().item() < 1e-7 and mismatch.item() < 1e-9
    with torch.no_grad():  # a different fake gives a clearly non-zero term
        for p in fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
        _, dF = M.responses(_f(fake, cond, abar, tau), x, v, 1e-2, "fd")
    assert M.gad_surrogate(x, dF, dT, 1e-2, "jvp", torch.ones(1))[1].item() > 1e-4


def test_finite_difference_approaches_exact_jvp_as_h_shrinks(tiny):
    pipe, teacher, cond, uncond, abar = tiny
    torch.manual_seed(5)
    x, v, tau = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([600, 600])
    f = _f(teacher, cond, abar, tau, 4.5, uncond)
    with torch.no_grad():
        _, exact = M.responses(f, x, v, 1.0, "exact")  # h * J v with h = 1: the JVP itself
        errs = [((M.responses(f, x, v, h, "fd")[1] / h - exact).norm() / exact.norm()).item() for h in (0.3, 0.03, 0.003)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2, errs


def test_perturbation_survives_because_differences_are_fp32_under_bf16(tiny):
    pipe, teacher, cond, uncond, abar = tiny
    torch.manual_seed(6)
    x, v, tau, h = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), 1e-2
    f = _f(teacher, cond, abar, tau)
    with torch.no_grad():
        _, ref = M.responses(f, x, v, h, "fd")  # fp32 reference
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.autocast("cpu", enabled=False):  # what --gad-fp32 does inside a bf16 step
                _, ours = M.responses(f, x, v, h, "fd")
            _, naive = M.responses(f, x, v, h, "fd")  # the network itself in bf16
    rel = lambda d: ((d - ref).norm() / ref.norm()).item()
    assert rel(ours) < 1e-5 and rel(naive) > 0.2, (rel(ours), rel(naive))


def test_ablation_helpers():
    tau = torch.tensor([100, 400, 800])
    assert M.gad_mask(tau, "all").flatten().tolist() == [1, 1, 1]
    assert M.gad_mask(tau, "high").flatten().tolist() == [0, 0, 1]
    assert M.gad_mask(tau, "mid").flatten().tolist() == [0, 1, 0]
    assert M.gad_mask(tau, "low").flatten().tolist() == [1, 0, 0]
    inc, dec = M.gad_h(tau, 1e-2, "increasing").flatten(), M.gad_h(tau, 1e-2, "decreasing").flatten()
    assert inc[0] > inc[2] and dec[0] < dec[2] and torch.allclose(M.gad_h(tau, 1e-2, "fixed").flatten(), torch.full((3,), 1e-2))
    v = M.direction((3, 4, 8, 8), "unit", "cpu")
    assert torch.allclose(v.flatten(1).norm(dim=1), torch.ones(3))


def test_fake_update_leaves_student_and_teacher_without_gradient(tiny):
    pipe, teacher, cond, uncond, abar = tiny
    student = copy.deepcopy(teacher).requires_grad_(True)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    x, t_g, t_mid, tau = torch.randn(2, 4, 16, 16), torch.tensor([899, 449]), torch.tensor([674, 224]), torch.tensor([700, 300])
    noise = torch.randn_like(x)
    with torch.no_grad():  # step 2 of train(): the student's prediction is data for the fake
        eps_s, x0_s = M.predict(student, x, t_g, cond, abar)
    a_m, s_m = M.alpha_sigma(abar, t_mid)
    x_tau = M.renoise(a_m * x0_s + s_m * eps_s, t_mid, tau, noise, abar)
    w = M.importance_weight(M.mixed_noise(eps_s, t_mid, tau, noise, abar), noise)
    M.tdm_fake_loss(M.predict(fake, x_tau, tau, cond, abar)[1], x0_s, tau, w, abar, 5.0).backward()
    assert all(p.grad is None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert sum(p.grad.abs().sum().item() for p in fake.parameters() if p.grad is not None) > 0


def test_smoke_gad_and_base_export_reload_reproduces_sampler(tmp_path):
    from diffusers import DiffusionPipeline

    out = str(tmp_path / "gad")
    m = M.train(M.Args(**TINY, steps=3, out=out))
    assert m["gad_mismatch"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in m.values())
    for f in ("samples.png", "teacher.png", "curves.png", "metrics.jsonl", "ckpt.pt", "pipeline/model_index.json"):
        assert os.path.exists(os.path.join(out, f)), f
    base = M.train(M.Args(**TINY, steps=2, out=str(tmp_path / "base"), gad_weight=0.0))
    assert base["gad_mismatch"] == 0
    # the stock pipeline with the documented call reproduces the training sampler
    pipe = DiffusionPipeline.from_pretrained(os.path.join(out, "pipeline"))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    lat = pipe("a red fox", latents=z, output_type="latent", **documented_call(M)).images  # the docstring's call
    export_call_covers_documented(M, os.path.join(out, "pipeline"), "pixart")  # what evaluate.py will run
    cond, _ = common.encode(pipe, "pixart", ["a red fox"], "cpu")
    abar = pipe.scheduler.alphas_cumprod.float()
    x0, states = M.sample(pipe.transformer, z, cond, (899, 674, 449, 224), abar, return_states=True)
    eps = M.predict(pipe.transformer, states[-1], torch.tensor([224]), cond, abar)[0]
    documented = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps  # TCD's last step (see Deviations)
    assert torch.allclose(lat.float(), documented, atol=1e-4)
    assert (lat.float() - x0).abs().max() < 0.1  # and that is within ~1% of eps of the student's x0


def test_bf16_step_runs_and_every_response_mode_runs(tmp_path):
    m = M.train(M.Args(**TINY, steps=1, out=str(tmp_path / "bf16"), dtype="bf16"))  # the CUDA default: bf16 JVPs
    assert m["gad_mismatch"] > 0
    m = M.train(M.Args(**TINY, steps=1, out=str(tmp_path / "fd"), gad_jvp="fd", gad_t_range="mid",
                       gad_h_schedule="increasing", gad_direction="unit", gad_form="paper"))
    assert torch.isfinite(torch.tensor(m["loss_tdm"]))
    m = M.train(M.Args(**TINY, steps=1, out=str(tmp_path / "resp"), gad_path="response", dtype="bf16"))
    assert m["gad_mismatch"] > 0 and m["grad_norm"] > 0


def test_resume_continues_exactly(tmp_path):
    """Exact resume with the default lr schedule (warm-up: a different lr every step) and an EMA, which is exported."""
    from safetensors.torch import load_file

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    kw = {**TINY, "ckpt_every": 2, "ema_decay": 0.5, "batch_size": 1, "grad_accum": 2}  # 2 micro-batches a step
    full = M.train(M.Args(**kw, steps=4, out=a))
    M.train(M.Args(**kw, steps=2, out=b))
    resumed = M.train(M.Args(**kw, steps=4, out=b, resume="latest"))
    assert resumed == full
    ca, cb = (torch.load(os.path.join(o, "ckpt.pt"), weights_only=True) for o in (a, b))
    for k in ("student", "ema"):
        assert all(torch.equal(ca["models"][k][n], cb["models"][k][n]) for n in ca["models"][k]), k
    assert ca["schedulers"] == cb["schedulers"] and ca["schedulers"]["opt_g"]["last_epoch"] == 4
    exported = load_file(os.path.join(b, "pipeline", "transformer", "diffusion_pytorch_model.safetensors"))
    ema, student = cb["models"]["ema"], cb["models"]["student"]
    assert all(torch.equal(exported[n], ema["module." + n]) for n in exported)  # the export is the EMA
    assert any(not torch.equal(exported[n], student[n]) for n in exported)
    rows = common.Logger.read(os.path.join(b, "metrics.jsonl"))
    assert [r["step"] for r in rows if "resume_changed" not in r] == [1, 2, 3, 4]
    assert rows[2] == {"step": 2, "resume_changed": {"steps": [2, 4]}}  # the safe change, logged (issue 12)


def test_eval_reports_geometry_and_diversity(tmp_path):
    out = str(tmp_path / "e")
    M.train(M.Args(**TINY, steps=1, out=out))
    m = M.train(M.Args(**TINY, out=out, resume="latest", eval=True, eval_seeds=2))
    assert {"jvp_cos", "jac_norm_ratio", "spectral_kl", "jvp_mse", "pointwise_mse", "diversity"} <= set(m)
    assert -1 <= m["jvp_cos"] <= 1 and m["diversity"] > 0


def test_bench_reports_ratios(tmp_path):
    m = M.train(M.Args(**TINY, out=str(tmp_path / "b"), bench=1))
    assert m["time_ratio"] > 0 and m["step_time_base"] > 0


def test_args_defaults_are_the_papers():
    a = M.Args()
    assert (a.lr, a.steps, a.batch_size, a.gad_h, a.gad_weight) == (4e-6, 2000, 64, 1e-2, 1.0)  # Table 11, PixArt
    assert a.timesteps == (899, 674, 449, 224) and a.cfg == 4.5 and a.huber_c == 1e-3
    assert dataclasses.fields(M.Args)  # every field has help text
    helptext = common.build_parser(M.Args).format_help()
    assert all(f.name.replace("_", "-") in helptext for f in dataclasses.fields(M.Args))


def test_trains_from_a_local_model_directory(tmp_path):
    """The real face, `--model /local/dir` (from_pretrained), on a saved tiny PixArt pipeline."""
    common.load_pipeline("pixart", "tiny").save_pretrained(str(tmp_path / "pixart"))
    m = M.train(M.Args(**{**TINY, "model": str(tmp_path / "pixart"), "prompts": "builtin"}, steps=1, out=str(tmp_path / "run")))
    assert m["gad_mismatch"] > 0 and os.path.exists(tmp_path / "run" / "pipeline" / "model_index.json")


def test_response_path_weight_gradient_matches_a_numerical_derivative_but_backprop_through_func_jvp_does_not():
    """float64. For L(theta) = mean(D * J_S v), back-propagating through common.jvp_pair (the exact response path)
    and through the finite difference both match a central difference of L in parameter space; back-propagating
    through torch.func.jvp does not (PyTorch's layer_norm JVP drops d(mean, rstd)/dtheta under reverse mode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipe = common.load_pipeline("pixart", "tiny")
    student = copy.deepcopy(pipe.transformer).double().requires_grad_(True)
    cond = common.cast(common.encode(pipe, "pixart", ["a red fox", "a blue car"], "cpu")[0], torch.float64)
    tau = torch.tensor([500, 300])
    g = torch.Generator().manual_seed(1)
    x, v, D = (torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64) for _ in range(3))
    f = lambda y: student(y, timestep=tau, **cond, return_dict=False)[0][:, :4]  # eps, float64 end to end
    L_pair = lambda: (D * common.jvp_pair(f, x, v)[1]).mean()
    L_func = lambda: (D * torch.func.jvp(f, (x,), (v,))[1]).mean()
    L_fd = lambda: (D * (f(x + 1e-5 * v) - f(x - 1e-5 * v)) / 2e-5).mean()
    params = list(student.parameters())
    delta = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    with sdpa_kernel(SDPBackend.MATH):
        directional = {}
        for name, L in (("pair", L_pair), ("fd", L_fd), ("func", L_func)):
            student.zero_grad()
            L().backward()
            directional[name] = sum((p.grad * d).sum() for p, d in zip(params, delta) if p.grad is not None).item()
        with torch.no_grad():
            for p, d in zip(params, delta):
                p.add_(1e-5 * d)
            plus = L_pair().item()
            for p, d in zip(params, delta):
                p.sub_(2e-5 * d)
            numeric = (plus - L_pair().item()) / 2e-5
    assert directional["pair"] == pytest.approx(numeric, rel=1e-6)
    assert directional["fd"] == pytest.approx(numeric, rel=1e-4)
    assert abs(directional["func"] - numeric) > 0.03 * abs(numeric)
