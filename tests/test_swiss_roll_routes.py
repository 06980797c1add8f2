"""Tests of swiss_roll_routes.py: where each GAD route's gradient points on a linear toy, and a fast run."""
import pytest
import torch

import swiss_roll_routes as rr


class LinearNet(torch.nn.Module):
    """v-prediction 'network' v(x, t) = N x (ignores t): its x0 map is the linear S(x) = (alpha I - sigma N) x."""

    def __init__(self, N):
        super().__init__()
        self.N = torch.nn.Parameter(N.clone())

    def forward(self, x, t):
        return x @ self.N.T


def _jacobian(net, tau):
    ab = rr.sr.ALPHA_BAR[tau].float()
    return ab.sqrt() * torch.eye(2) - (1 - ab).sqrt() * net.N.detach()


def _route_grads(route, n, h=1e-2, seed=0):
    """Gradient w.r.t. N of the GAD term for one fixed (x_k, x_tau) point and n directions v (batch of n copies):
    the mean over directions, and the mean norm of single-direction gradients. Teacher and fake: fixed linear x0 maps
    M_T, M_F with M_F = the student's own x0 Jacobian (the fake tracks the student), so the Jacobian target is M_T."""
    g = torch.Generator().manual_seed(seed)
    student = LinearNet(0.3 * torch.randn(2, 2, generator=g))
    t_k, tau = torch.tensor([999]), torch.tensor([500])
    M_T, M_F = torch.randn(2, 2, generator=g), _jacobian(student, tau)
    x_k, eps = torch.randn(1, 2, generator=g).repeat(n, 1), torch.randn(1, 2, generator=g).repeat(n, 1)
    v = torch.randn(n, 2, generator=g)
    d = h * (v / v.norm(dim=1, keepdim=True) if route == "released" else v)
    ab = rr.sr.ALPHA_BAR[tau].float()

    def grad(idx):
        x0_hat = rr.x0_pred(student, x_k[idx], t_k.repeat(len(idx)))
        x_tau = ab.sqrt() * x0_hat + (1 - ab).sqrt() * eps[idx]  # depends on N through x0_hat
        term = rr.gad_term(route, student, x_tau, x0_hat, tau.repeat(len(idx)), d[idx], d[idx] @ M_T.T,
                           d[idx] @ M_F.T, h, 1e-3)
        return torch.autograd.grad(term, student.N)[0]

    mean = grad(torch.arange(n))
    single = torch.stack([grad(torch.tensor([i])).norm() for i in range(16)]).mean()
    return mean, single, student, M_T, tau


def test_printed_route_averages_to_zero_over_directions():
    """xtau: g = (M_F - M_T) v is linear in v and dx_tau/dN does not depend on v: the mean is exactly zero (what
    remains is Monte Carlo noise, ~1/sqrt(n) of a single draw)."""
    mean, single, *_ = _route_grads("xtau", 8000)
    assert mean.norm() / single < 0.03, (mean.norm().item(), single.item())


def test_released_route_mean_is_order_h_under_order_one_noise():
    """released: a single draw is dominated by the O(1)/h gap S(x_tau + delta, tau) - S(x_k, t_k) times a sign odd in
    delta (zero mean). What survives the average is O(h) relative to a draw, and it leans the response route's way."""
    ratio = {}
    for h in (0.1, 1e-2):
        mean, single, *_ = _route_grads("released", 8000, h=h)
        ratio[h] = (mean.norm() / single).item()
    assert ratio[1e-2] < 0.1 and ratio[0.1] > 4 * ratio[1e-2], ratio
    released, response = _route_grads("released", 8000, h=0.1)[0], _route_grads("response", 8000, h=0.1)[0]
    assert torch.nn.functional.cosine_similarity(released.flatten(), response.flatten(), dim=0) > 0.5


def test_response_route_pushes_the_student_jacobian_towards_the_teacher():
    mean, single, student, M_T, tau = _route_grads("response", 8000)
    assert mean.norm() / single > 0.3, (mean.norm().item(), single.item())
    J0 = _jacobian(student, tau)
    with torch.no_grad():
        student.N -= 0.1 * mean / mean.norm()  # a small descent step along the mean gradient
    dJ = _jacobian(student, tau) - J0
    assert torch.nn.functional.cosine_similarity(dJ.flatten(), (M_T - J0).flatten(), dim=0) > 0.99
    assert (_jacobian(student, tau) - M_T).norm() < (J0 - M_T).norm()


def test_unknown_route_fails_loudly():
    with pytest.raises(ValueError):
        rr.gad_term("nope", None, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1]), torch.zeros(1, 2),
                    torch.zeros(1, 2), torch.zeros(1, 2), 0.1, 1e-3)


def test_fast_run_response_moves_the_jvp_cosine_and_xtau_does_not():
    """The finding of the full run (README), small: at lambda = 1 the response route moves the 1-step student's JVP
    cosine (down, away from the teacher's) by several times what the printed route (xtau) moves it, from the same
    init, batches and noises."""
    torch.manual_seed(0)
    args = rr.Args(teacher_iters=300, teacher_batch=256, pre_iters=100, pool=2048, iters=60, batch=128,
                   lam_xtau=1.0, lam_response=1.0)
    teacher = rr.sr.fit_teacher(args, torch.device("cpu"))
    init = rr.pointwise_init(teacher, args, 1)
    phi_t = lambda y: rr.sr.sample(teacher, y, rr.sr.TEACHER_TS)
    z, cos = torch.randn(256, 2), {}
    for route in ("", "xtau", "response"):
        torch.manual_seed(1)  # the same batches and noises for every route
        student = rr.distil(teacher, init, args, 1, route, args.iters)["student"]
        phi_s = lambda y, s=student: rr.sr.sample(s, y, rr.sr.TEACHER_TS[::40])
        cos[route] = rr.geometry_metrics(phi_s, phi_t, z, n_dirs=2, seed=0)["jvp_cos"]
    moved = {r: abs(cos[r] - cos[""]) for r in ("xtau", "response")}
    assert moved["response"] > 3 * moved["xtau"] and moved["response"] > 1e-3, cos
