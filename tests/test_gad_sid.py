"""Tests for gad_sid.py on the tiny SANA pipeline (CPU, one thread)."""
import copy
import dataclasses
import os

import pytest
import torch
from docs_call import documented_call, export_call_covers_documented

import common
import gad_sid as gs

B = 2


@pytest.fixture(autouse=True)
def _no_matplotlib(monkeypatch):
    """Grids and curves are made (empty files) but not drawn: a period of 0 still samples at the end (issue 12), and
    matplotlib costs ~1 s per picture here; common.save_grid / plot_curves are tested in test_common.py."""
    monkeypatch.setattr(common, "save_grid", lambda images, path, nrow: open(path, "wb").close())
    monkeypatch.setattr(common, "plot_curves", lambda jsonl, png: open(png, "wb").close())


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)  # the tiny pipeline's random weights come from the global RNG
    p = common.load_pipeline("sana", "tiny")
    p._prompt_cache = {}  # gad_sid.train caches prompt embeddings here across in-process runs
    return p


@pytest.fixture(scope="module")
def conds(pipe):
    return common.encode(pipe, "sana", ["a red fox", "a lighthouse"], "cpu")


def tiny_args(tmp_path, **kw):
    base = dict(model="tiny", steps=2, batch_size=B, sample_every=0, ckpt_every=100, log_every=1, out=str(tmp_path),
                export=False, lr=1e-3, lr_fake=1e-3, threads=1)
    return gs.Args(**{**base, **kw})


# ---- equations on hand-made tensors ------------------------------------------------------------


def test_sid_generator_loss_matches_loops():
    g = torch.Generator().manual_seed(0)
    y_r, y_f, x_g = (torch.randn(2, 3, 2, 2, generator=g) for _ in range(3))
    sigma, alpha = torch.tensor([0.3, 0.8]), 0.7
    total = 0.0
    for b in range(2):
        for i in range(12):
            r, f, x = y_r[b].flatten()[i].item(), y_f[b].flatten()[i].item(), x_g[b].flatten()[i].item()
            total += (r - f) * ((r - x) - alpha * (r - f)) * (1 - sigma[b].item())
    assert gs.sid_generator_loss(y_r, y_f, x_g, sigma, alpha).item() == pytest.approx(total / 24, rel=1e-5)
    # direct gradient on x_g (scores held fixed) is w (y_f - y_r) / N: SiD's orientation, which GAD shares
    x = x_g.clone().requires_grad_(True)
    gs.sid_generator_loss(y_r, y_f, x, sigma, 1.0).backward()
    torch.testing.assert_close(x.grad, (1 - sigma.view(-1, 1, 1, 1)) * (y_f - y_r) / 24)


def test_loss_scale_is_ml_sid_dits_on_known_tensors():
    """--loss-reduction sum (default): generator sum x 100 / batch, fake sum / batch, as ml-sid-dit reduces them;
    mean: our per-element means (a factor C H W x 100 = 819,200 smaller at SANA-512 for the generator)."""
    g = torch.Generator().manual_seed(2)
    y_r, y_f, x_g, v_F, eps = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(5))
    sigma, alpha = torch.tensor([0.2, 0.5, 0.9]), 1.2
    d = y_r - y_f
    official_g = (d * ((y_r - x_g) - alpha * d) * (1 - sigma).view(-1, 1, 1, 1)).sum() * 100 / 3
    official_f = torch.nn.functional.mse_loss(v_F, eps - x_g, reduction="sum") / 3
    ours_g = gs.loss_scale(x_g, "generator", "sum") * gs.sid_generator_loss(y_r, y_f, x_g, sigma, alpha)
    ours_f = gs.loss_scale(x_g, "fake", "sum") * gs.fake_score_loss(v_F, eps, x_g)
    assert ours_g.item() == pytest.approx(official_g.item(), rel=1e-5)
    assert ours_f.item() == pytest.approx(official_f.item(), rel=1e-5)
    assert gs.loss_scale(x_g, "generator", "mean") == gs.loss_scale(x_g, "fake", "mean") == 1.0
    assert gs.loss_scale(torch.zeros(8, 32, 16, 16), "generator", "sum") == 819200  # SANA-512 latents
    assert gs.Args().loss_reduction == "sum"


def test_fake_loss_and_flow_algebra():
    g = torch.Generator().manual_seed(1)
    x0, eps, v = (torch.randn(2, 3, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.25, 0.9])
    x = gs.renoise(x0, eps, sigma)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(x, (1 - s) * x0 + s * eps)
    # the exact velocity eps - x0 recovers x0 and has zero fake loss
    torch.testing.assert_close(x - s * (eps - x0), x0)
    assert gs.fake_score_loss(eps - x0, eps, x0).item() == pytest.approx(0.0, abs=1e-12)
    assert gs.fake_score_loss(v, eps, x0).item() == pytest.approx(((v - eps + x0) ** 2).mean().item(), rel=1e-6)


def test_gad_direction_orientation_and_forms():
    """Sign: D is parallel to the score-space gap (Delta s_F - Delta s_R), anti-parallel to the literal eps gap,
    and equals the change of SiD's own direct x_g-gradient between x_t + h v and x_t (paper form)."""
    g = torch.Generator().manual_seed(2)
    W_r, W_f = torch.randn(12, 12, generator=g) / 4, torch.randn(12, 12, generator=g) / 4

    def vel(W, x):  # a nonlinear velocity field standing in for a network
        return torch.tanh(x.flatten(1) @ W).view_as(x)

    x_t, v_dir = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    sigma, h = torch.tensor([0.3, 0.7]), 1e-2
    s = sigma.view(-1, 1, 1, 1)
    x0 = {k: (lambda x, W=W: x - s * vel(W, x)) for k, W in (("r", W_r), ("f", W_f))}
    eps = {k: (lambda x, W=W: x + (1 - s) * vel(W, x)) for k, W in (("r", W_r), ("f", W_f))}
    dx0 = {k: f(x_t + h * v_dir) - f(x_t) for k, f in x0.items()}
    deps = {k: f(x_t + h * v_dir) - f(x_t) for k, f in eps.items()}
    D = gs.gad_direction(dx0["f"], dx0["r"], sigma, h, "paper")
    dscore = -(deps["f"] - deps["r"]) / s  # score = -eps / sigma
    torch.testing.assert_close(D, (1 - s) * s**2 / (1 - s) * dscore, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(D, -(1 - s) * (s / (1 - s)) * (deps["f"] - deps["r"]), rtol=1e-4, atol=1e-7)
    cos = torch.nn.functional.cosine_similarity(D.flatten(1), (deps["f"] - deps["r"]).flatten(1), dim=1)
    assert (cos < -0.9999).all()  # per sample: the literal eps reading of Eq. 9 points the other way
    # gradient of the surrogate on x_t = D / N = change of SiD's direct gradient w (y_f - y_r) / N under x_t -> x_t + h v
    x = x_t.clone().requires_grad_(True)
    gs.gad_surrogate(D, x).backward()
    direct = {p: (1 - s) * (x0["f"](p) - x0["r"](p)) / x_t.numel() for p in (x_t, x_t + h * v_dir)}
    torch.testing.assert_close(x.grad, direct[list(direct)[1]] - direct[x_t], rtol=1e-4, atol=1e-9)
    # --gad-form jvp is the printed form divided by h
    torch.testing.assert_close(gs.gad_direction(dx0["f"], dx0["r"], sigma, h, "jvp"), D / h)


def test_gad_descent_reduces_response_gap():
    """Descending L_GAD on x_t with an x_t-dependent response gap reduces ||Delta x0_F - Delta x0_R||^2 when the
    gap is the gradient of a potential (a case where Eq. 9's push is an exact descent direction)."""
    h, v_dir = 1e-3, torch.ones(1, 1, 1, 4)
    sigma = torch.tensor([0.5])

    def x0_f(x):  # fake response grows like x^2 along v; the teacher's x0 map is linear (response constant)
        return x + 0.5 * x**2

    def x0_r(x):
        return x

    def gap(x):
        return (x0_f(x + h * v_dir) - x0_f(x) - (x0_r(x + h * v_dir) - x0_r(x))) / h

    x = torch.tensor([[[[0.5, 1.0, -0.2, 2.0]]]], requires_grad=True)
    before = gap(x).pow(2).sum().item()
    D = gs.gad_direction(x0_f(x + h * v_dir) - x0_f(x), x0_r(x + h * v_dir) - x0_r(x), sigma, h, "jvp")
    gs.gad_surrogate(D, x).backward()
    with torch.no_grad():
        x_new = x - 0.5 * x.grad
    assert gap(x_new).pow(2).sum().item() < before


# ---- networks: GAD responses, routing ----------------------------------------------------------


def test_gad_zero_when_fake_is_teacher(pipe, conds):
    T = pipe.transformer
    F = copy.deepcopy(T)
    cond, uncond = conds
    g = torch.Generator().manual_seed(3)
    x_t, v_dir = torch.randn(common.latent_shape(pipe, B), generator=g), torch.randn(common.latent_shape(pipe, B), generator=g)
    sigma = torch.tensor([0.4, 0.7])
    dr = gs.gad_delta(T, x_t, sigma, v_dir, 1e-2, "fd", cond, uncond, 4.5)
    df = gs.gad_delta(F, x_t, sigma, v_dir, 1e-2, "fd", cond, uncond, 4.5)
    assert dr.abs().max() > 0
    D = gs.gad_direction(df, dr, sigma, 1e-2, "jvp")
    assert D.abs().max().item() == 0.0


def test_fd_approaches_exact_jvp(pipe, conds):
    T, (cond, uncond) = pipe.transformer, conds
    g = torch.Generator().manual_seed(4)
    x_t, v_dir = torch.randn(common.latent_shape(pipe, B), generator=g), torch.randn(common.latent_shape(pipe, B), generator=g)
    sigma = torch.tensor([0.5, 0.8])
    exact = gs.gad_delta(T, x_t, sigma, v_dir, 1.0, "exact", cond, uncond, 4.5)  # h = 1: J v itself
    errs = [((gs.gad_delta(T, x_t, sigma, v_dir, h, "fd", cond, uncond, 4.5) / h - exact).norm() / exact.norm()).item()
            for h in (1e-1, 1e-4)]
    # SANA's linear attention has ReLU kernels: a difference converges only once h v crosses no kink (random tiny
    # weights: error 0.16 at h = 1e-2, 0.02 at 1e-3, 0.003 at 1e-4, where fp32 rounding starts to show)
    assert errs[1] < 5e-3 and errs[1] < errs[0] / 10, errs


def test_rollout_only_last_step_has_grad(pipe, conds):
    calls = []

    class Rec(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.config = net, net.config

        def forward(self, *a, **k):
            calls.append(torch.is_grad_enabled())
            return self.net(*a, **k)

    G = Rec(copy.deepcopy(pipe.transformer).requires_grad_(True))
    z = torch.randn(common.latent_shape(pipe, B))
    x_g = gs.rollout(G, z, conds[0], (1.0, 0.75, 0.5, 0.25), 3)
    assert calls == [False, False, True] and x_g.requires_grad


def test_generator_update_gradient_routing(pipe, conds, tmp_path):
    args = tiny_args(tmp_path)
    teacher = pipe.transformer
    student = copy.deepcopy(teacher).requires_grad_(True)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():  # make fake differ from the teacher so both SiD and GAD are non-zero
        for p in fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond, uncond = conds
    z = torch.randn(common.latent_shape(pipe, B))
    x_g = gs.rollout(student, z, cond, args.t_gen, 2)
    out = gs.generator_update(args, 1, teacher, fake, x_g, torch.tensor([0.4, 0.6]), torch.randn_like(z),
                              torch.randn_like(z), cond, uncond, True, common.autocast(z.device, torch.float32))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in fake.parameters()) and all(p.requires_grad for p in fake.parameters())
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
    assert out["loss_gad"] != 0 and out["gad_gap"] > 0


def test_batched_and_separate_gad_agree(pipe, conds, tmp_path):
    """Batching the perturbed rows into the SiD forwards gives the same losses and gradients as separate ones."""
    args, grads = tiny_args(tmp_path, gad_jvp="fd"), []
    fake = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(5)
    z, eps, v_dir = (torch.randn(common.latent_shape(pipe, B), generator=g) for _ in range(3))
    outs = []
    for batched in (True, False):
        student = copy.deepcopy(pipe.transformer).requires_grad_(True)
        x_g = gs.rollout(student, z, conds[0], args.t_gen, 1)
        outs.append(gs.generator_update(args, 1, pipe.transformer, fake, x_g, torch.tensor([0.3, 0.9]), eps, v_dir,
                                        *conds, batched, common.autocast(z.device, torch.float32)))
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert outs[0]["loss_sid"] == pytest.approx(outs[1]["loss_sid"], rel=1e-4)
    k = gs.loss_scale(z, "generator", args.loss_reduction)  # the tolerances below are for per-element means
    assert outs[0]["loss_gad"] == pytest.approx(outs[1]["loss_gad"], rel=1e-3, abs=1e-9 * k)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-7 * k)


# ---- in-process runs ---------------------------------------------------------------------------


def test_smoke_gad_export_reproduces_sampler(pipe, tmp_path):
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res = gs.train(tiny_args(tmp_path, export=True, sample_every=2), pipe=pipe)
    assert res["loss_gad"] == res["loss_gad"] and res["gad_gap"] >= 0
    assert (tmp_path / "samples_000002.png").exists() and (tmp_path / "metrics.jsonl").exists()
    rows = common.Logger.read(str(tmp_path / "metrics.jsonl"))
    assert rows[0]["loss_gad"] == 0.0 and rows[0]["gad_gap"] == 0.0  # step 1: fake == teacher
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())  # teacher untouched

    from diffusers import DiffusionPipeline

    exported = DiffusionPipeline.from_pretrained(res["pipeline"])
    z = torch.randn(common.latent_shape(pipe, 1))
    out = exported("a red fox", latents=z.clone(), generator=torch.Generator().manual_seed(7), output_type="latent",
                   **documented_call(gs)).images  # the docstring's "Reload with" call
    assert documented_call(gs).items() <= res["pipeline_call"].items()
    export_call_covers_documented(gs, res["pipeline"], "sana")  # what evaluate.py will run
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    student = copy.deepcopy(pipe.transformer)
    student.load_state_dict(ckpt["models"]["student"])
    cond, _ = common.encode(pipe, "sana", ["a red fox"], "cpu")
    with torch.no_grad():
        ours = gs.rollout(student, z, cond, (1.0, 0.75, 0.5, 0.25), 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.float(), ours, rtol=1e-4, atol=1e-5)


def test_smoke_plain_sid_and_variants(pipe, tmp_path):
    # periods 0 = never, the end still gets its row, grid and checkpoint (issue 12: was ZeroDivisionError)
    r0 = gs.train(tiny_args(tmp_path / "sid", gad_weight=0.0, fake_cfg=False, log_every=0, ckpt_every=0), pipe=pipe)
    assert [r["step"] for r in common.Logger.read(str(tmp_path / "sid" / "metrics.jsonl"))] == [2]
    assert {"ckpt.pt", "samples_000002.png"} <= set(os.listdir(tmp_path / "sid"))
    assert r0["loss_gad"] == 0.0 and "gad_gap" not in r0
    r1 = gs.train(tiny_args(tmp_path / "paper", gad_form="paper", gad_jvp="exact", steps=2), pipe=pipe)
    assert all(r1[k] == r1[k] for k in ("loss_sid", "loss_gad", "loss_fake"))


def test_eval_metrics(pipe, tmp_path):
    res = gs.train(tiny_args(tmp_path, steps=1, eval=True, eval_teacher_steps=4, prompts=""), pipe=pipe)
    for k in ("eval_jvp_cos", "eval_jac_norm_ratio", "eval_spectral_kl", "diversity_student", "diversity_teacher"):
        assert res[k] == res[k], k
    assert -1 <= res["eval_jvp_cos"] <= 1 and res["diversity_student"] > 0


def test_resume_is_exact(pipe, tmp_path):
    accum = dict(batch_size=1, grad_accum=2)  # 2 micro-batches per step (issue 15)
    full = gs.train(tiny_args(tmp_path / "a", steps=3, **accum), pipe=pipe)
    gs.train(tiny_args(tmp_path / "b", steps=2, **accum), pipe=pipe)
    resumed = gs.train(tiny_args(tmp_path / "b", steps=3, resume="latest", **accum), pipe=pipe)
    for k in ("loss_sid", "loss_gad", "loss_fake"):
        assert resumed[k] == full[k], k
    wa, wb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["models"]["student"] for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nonfinite_loss_stops_with_step(pipe, tmp_path, monkeypatch):
    sample_sigma = gs.sample_sigma  # a NaN inside the step (a NaN flag is refused up front: issue 12)
    monkeypatch.setattr(gs, "sample_sigma", lambda *a: sample_sigma(*a) * float("nan"))
    with pytest.raises(FloatingPointError, match="step 1"):
        gs.train(tiny_args(tmp_path), pipe=pipe)


def test_args_defaults_are_table11():
    a = gs.Args()
    assert (a.lr, a.steps, a.batch_size, a.gad_h, a.gad_weight, a.cfg) == (5e-6, 5000, 8, 1e-2, 1.0, 4.5)
    assert dataclasses.asdict(common.parse(gs.Args, ["--no-fake-cfg", "--gad-form", "paper"]))["fake_cfg"] is False


def test_bf16_run_with_gad_and_eval(tmp_path):
    """bf16 autocast with fp32 finite differences and fp32 eval (a fresh pipeline: bf16 casts its text encoder)."""
    res = gs.train(tiny_args(tmp_path, steps=1, dtype="bf16", eval=True, eval_teacher_steps=2, prompts=""))
    assert res["loss_gad"] == res["loss_gad"] and -1 <= res["eval_jvp_cos"] <= 1


def test_response_path_reaches_the_generator_through_its_own_response(pipe, conds, tmp_path):
    """--gad-path response: the GAD vector D drives G's own x0 response, so GAD adds a gradient on G's weights;
    teacher and fake get none; by the exact JVP (default) and by the fp32 finite difference."""
    teacher, (cond, uncond) = pipe.transformer, conds
    fake = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, eps, v_dir = (torch.randn(common.latent_shape(pipe, B), generator=torch.Generator().manual_seed(i)) for i in range(3))
    grads = {}
    for name, kw in [("base", {}), ("xtau", {}), ("response", dict(gad_path="response")),
                     ("response_fd", dict(gad_path="response", gad_jvp="fd"))]:
        args = tiny_args(tmp_path, **kw)
        torch.manual_seed(0)
        student = copy.deepcopy(teacher).requires_grad_(True)
        x_g = gs.rollout(student, z, cond, args.t_gen, 2)
        gs.generator_update(args, 1, teacher, fake, x_g,
                            torch.tensor([0.4, 0.6]), eps, None if name == "base" else v_dir, cond, uncond, False,
                            common.autocast(z.device, torch.float32), G=student)
        grads[name] = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    extra_xtau = grads["xtau"] - grads["base"]
    for resp in ("response", "response_fd"):
        extra = grads[resp] - grads["base"]
        assert extra.norm() > 1e-3 * grads["base"].norm() and (extra - extra_xtau).norm() > 1e-3 * extra.norm()
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in fake.parameters())


def test_response_path_smoke(pipe, tmp_path):
    res = gs.train(tiny_args(tmp_path, steps=2, gad_path="response"), pipe=pipe)
    assert res["loss_gad"] == res["loss_gad"] and res["gad_gap"] > 0
