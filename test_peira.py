"""Tests for peira.py: every number is checked against an independent computation.

    python -m pytest -q test_peira.py
"""
import doctest
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import peira

F64 = torch.float64


def random_pair(n, k, seed, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, k, generator=g, dtype=F64)
    v = u @ torch.randn(k, k, generator=g, dtype=F64) / k ** 0.5 + noise * torch.randn(n, k, generator=g, dtype=F64)
    return u, v


def random_joint(nx, ny, seed):
    g = torch.Generator().manual_seed(seed)
    J = torch.rand(nx, ny, generator=g, dtype=F64) ** 3 + 0.01 * torch.eye(nx, ny, dtype=F64)
    return J / J.sum()


def population_samples(joint, U, V):
    """All pairs (x, y), scaled by sqrt(n J_xy): batch means of quadratic forms of (u, v) over
    these samples are expectations under the joint (moments and the auxiliary loss are quadratic)."""
    nx, ny = joint.shape
    w = (joint.numel() * joint).sqrt().reshape(-1, 1)
    return w * U.repeat_interleave(ny, 0), w * V.repeat(nx, 1)


def test_doctests():
    assert doctest.testmod(peira).failed == 0


# -----------------------------------------------------------------------------
# regressor, objective and auxiliary loss

def test_moments_definition():
    u, v = random_pair(50, 4, seed=0)
    N, S = peira.moments(u, v)
    N_loop = sum(torch.outer(a, a) + torch.outer(b, b) for a, b in zip(u, v)) / 50
    S_loop = sum(torch.outer(a, b) + torch.outer(b, a) for a, b in zip(u, v)) / 50
    torch.testing.assert_close(N, N_loop)
    torch.testing.assert_close(S, S_loop)
    Nc, Sc = peira.moments(u, v, center=True)
    uc, vc = u - u.mean(0), v - v.mean(0)
    torch.testing.assert_close(Nc, (uc.T @ uc + vc.T @ vc) / 50)
    torch.testing.assert_close(Sc, (uc.T @ vc + vc.T @ uc) / 50)


@pytest.mark.parametrize("k,lam", [(1, 0.3), (4, 0.05), (4, 2.0), (16, 0.5)])
def test_optimal_regressor_is_the_ridge_minimiser(k, lam):
    u, v = random_pair(200, k, seed=k)
    P, Q = peira.optimal_regressor(*peira.moments(u, v), lam)
    # Independent: ½mean‖Pu − v‖² + ½mean‖Pv − u‖² + (λ/2)‖P‖² is least squares on the
    # stacked system [X/√n; √λ I] Pᵀ = [Y/√n; 0] with X = [u; v], Y = [v; u].
    n = u.shape[0]
    X, Y = torch.cat([u, v]), torch.cat([v, u])
    A = torch.cat([X / n ** 0.5, lam ** 0.5 * torch.eye(k, dtype=F64)])
    b = torch.cat([Y / n ** 0.5, torch.zeros(k, k, dtype=F64)])
    P_lstsq = torch.linalg.lstsq(A, b).solution.T
    torch.testing.assert_close(P, P_lstsq, rtol=1e-9, atol=1e-10)
    N, _ = peira.moments(u, v)
    torch.testing.assert_close(Q @ (N + lam * torch.eye(k, dtype=F64)), torch.eye(k, dtype=F64))


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("lam", [0.05, 0.7, 3.0])
@pytest.mark.parametrize("center", [False, True])
def test_aux_loss_has_the_gradient_of_the_objective(k, lam, center):
    u, v = random_pair(40, k, seed=10 * k)
    u.requires_grad_(True); v.requires_grad_(True)
    grad_exact = torch.autograd.grad(peira.peira_objective(u, v, lam, center), (u, v))
    N, S = peira.moments(u.detach(), v.detach(), center)
    P, Q = peira.optimal_regressor(N, S, lam)
    # Centering with the detached batch mean, as PEIRALoss does.
    uc = u - u.detach().mean(0) if center else u
    vc = v - v.detach().mean(0) if center else v
    grad_aux = torch.autograd.grad(peira.aux_loss(uc, vc, P, Q, lam), (u, v))
    for g_exact, g_aux in zip(grad_exact, grad_aux):
        torch.testing.assert_close(g_aux, g_exact, rtol=1e-10, atol=1e-12)
    # and the closed form ∂u = (QSQu − Qv + λu) / B
    QSQ = Q @ S @ Q
    ud, vd = (uc.detach(), vc.detach())
    closed = (ud @ QSQ - vd @ Q + lam * ud) / 40
    if center:
        closed = closed - closed.mean(0)
    torch.testing.assert_close(grad_aux[0], closed, rtol=1e-10, atol=1e-12)


def test_low_precision_inputs_are_computed_in_float32():
    u, v = random_pair(64, 6, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ub, vb = (u.float() @ torch.eye(6)), (v.float() @ torch.eye(6))  # bf16 under autocast
        assert ub.dtype == torch.bfloat16
        N, S = peira.moments(ub, vb)
        P, Q = peira.optimal_regressor(N, S, 0.1)
        loss = peira.aux_loss(ub, vb, P, Q, 0.1)
    assert N.dtype == P.dtype == loss.dtype == torch.float32
    N_ref, _ = peira.moments(ub.double(), vb.double())
    torch.testing.assert_close(N.double(), N_ref, rtol=1e-6, atol=1e-6)


# -----------------------------------------------------------------------------
# nonlinear CCA, the global minimum and the filters

@pytest.mark.parametrize("shape,seed", [((5, 5), 0), ((7, 4), 1), ((3, 9), 2)])
def test_nonlinear_cca_matches_a_direct_computation(shape, seed):
    J = random_joint(*shape, seed)
    s, u, v = peira.nonlinear_cca(J)
    px, py = J.sum(1), J.sum(0)
    r = min(shape)
    torch.testing.assert_close(u.T @ (px[:, None] * u), torch.eye(r, dtype=F64))
    torch.testing.assert_close(v.T @ (py[:, None] * v), torch.eye(r, dtype=F64))
    torch.testing.assert_close(u.T @ J @ v, torch.diag(s))
    assert abs(s[0].item() - 1) < 1e-12 and (s[:-1] >= s[1:]).all()
    # Independent: s_i² are the eigenvalues of the operator E[E[u(x') | y] | x] on L2(P_x),
    # the matrix D_x⁻¹ J D_y⁻¹ Jᵀ, and u_i its eigenfunctions.
    T = (J / px[:, None]) @ (J.T / py[:, None])
    eig = torch.linalg.eigvals(T).real.sort(descending=True).values[:r]
    torch.testing.assert_close(s.square(), eig.clamp_min(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(T @ u, u * s.square(), rtol=1e-8, atol=1e-9)


def test_nonlinear_cca_equals_linear_cca_of_one_hot_codes():
    """On an empirical distribution, the nonlinear canonical correlations after the constant are
    the linear canonical correlations of the one-hot codes (one column dropped: centering makes
    the full code rank-deficient)."""
    g = torch.Generator().manual_seed(3)
    nx, ny, n = 5, 4, 4000
    J = random_joint(nx, ny, seed=3)
    pairs = torch.multinomial(J.flatten(), n, replacement=True, generator=g)
    x, y = pairs // ny, pairs % ny
    J_emp = torch.zeros(nx * ny, dtype=F64).index_add_(0, pairs, torch.ones(n, dtype=F64)).view(nx, ny) / n
    s_nl, _, _ = peira.nonlinear_cca(J_emp)
    s_lin, A, B = peira.linear_cca(nn.functional.one_hot(x, nx)[:, 1:].double(),
                                   nn.functional.one_hot(y, ny)[:, 1:].double())
    torch.testing.assert_close(s_lin, s_nl[1:], rtol=1e-9, atol=1e-10)


def test_linear_cca_whitens_and_diagonalises():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(500, 3, generator=g, dtype=F64)
    x = torch.cat([z, torch.randn(500, 2, generator=g, dtype=F64)], 1) @ torch.randn(5, 5, generator=g, dtype=F64)
    y = z @ torch.randn(3, 4, generator=g, dtype=F64) + 0.5 * torch.randn(500, 4, generator=g, dtype=F64)
    s, A, B = peira.linear_cca(x, y)
    a, b = (x - x.mean(0)) @ A, (y - y.mean(0)) @ B
    torch.testing.assert_close(a.T @ a / 500, torch.eye(4, dtype=F64))
    torch.testing.assert_close(b.T @ b / 500, torch.eye(4, dtype=F64))
    torch.testing.assert_close(a.T @ b / 500, torch.diag(s))
    # Independent: s² are the eigenvalues of Cxx⁻¹ Cxy Cyy⁻¹ Cyx
    xc, yc = x - x.mean(0), y - y.mean(0)
    Cxx, Cyy, Cxy = xc.T @ xc / 500, yc.T @ yc / 500, xc.T @ yc / 500
    eig = torch.linalg.eigvals(torch.linalg.solve(Cxx, Cxy) @ torch.linalg.solve(Cyy, Cxy.T))
    torch.testing.assert_close(s.square(), eig.real.sort(descending=True).values[:4], rtol=1e-8, atol=1e-10)


def test_filters_closed_forms():
    s = torch.tensor([1.0, 0.81, 0.49, 0.04, 0.0], dtype=F64)
    torch.testing.assert_close(peira.peira_filter(s, 0.1),
                               torch.tensor([0.45, 0.4, 0.3, 0.05, 0.0], dtype=F64).sqrt())
    lam = 0.1
    f = peira.simsiam_filter(s, lam)
    # Independent: a SimSiam equilibrium with amplitude f on a direction of correlation s has
    # optimal predictor p = f²s/(f² + λ) and stationarity p(p − s) + λ = 0 with p = f (stable root).
    admissible = s.square() >= 4 * lam
    fa, sa = f[admissible], s[admissible]
    p = fa.square() * sa / (fa.square() + lam)
    torch.testing.assert_close(p, fa)
    torch.testing.assert_close(p * (p - sa) + lam, torch.zeros_like(p), atol=1e-12, rtol=0)
    assert (f[~admissible] == 0).all()


def test_global_minimum_value_at_the_filtered_cca_solution():
    J = random_joint(6, 5, seed=5)
    s, u, v = peira.nonlinear_cca(J)
    k, lam = 3, 0.2
    q = torch.linalg.qr(torch.randn(k, k, dtype=F64, generator=torch.Generator().manual_seed(0)))[0]
    a = peira.peira_filter(s[:k], lam)
    U, V = (u[:, :k] * a) @ q.T, (v[:, :k] * a) @ q.T
    L = peira.peira_objective(*population_samples(J, U, V), lam)
    expected = -((s[:k].sqrt() - lam).clamp_min(0).square()).sum() / 2
    assert abs(L.item() - expected.item()) < 1e-12


@pytest.mark.parametrize("k,lam,seed", [(2, 0.1, 0), (3, 0.3, 1), (4, 0.5, 2)])
def test_aux_loss_training_reaches_the_global_minimum(k, lam, seed):
    """Gradient flow on tables U, V with PEIRALoss (eta = 1, exact population moments) reaches
    −Σ max(√s_i − λ, 0)²/2, with amplitudes peira_filter(s_i, λ)."""
    J = random_joint(6, 5, seed=seed)
    s, u_cca, v_cca = peira.nonlinear_cca(J)
    px, py = J.sum(1), J.sum(0)
    g = torch.Generator().manual_seed(100 + seed)
    U = (0.3 * torch.randn(6, k, generator=g, dtype=F64)).requires_grad_()
    V = (0.3 * torch.randn(5, k, generator=g, dtype=F64)).requires_grad_()
    loss_fn = peira.PEIRALoss(k, lam=lam, eta=1.0).double()
    for _ in range(3000):
        loss = loss_fn(*population_samples(J, U, V))
        gU, gV = torch.autograd.grad(loss, (U, V))
        with torch.no_grad():  # the L2(P_x) gradient flow: table gradients divided by p(x)
            U -= 0.5 * gU / px[:, None]
            V -= 0.5 * gV / py[:, None]
    expected = -((s[:k].sqrt() - lam).clamp_min(0).square()).sum().item() / 2
    L = peira.peira_objective(*population_samples(J, U.detach(), V.detach()), lam).item()
    assert abs(L - expected) < 1e-9
    # amplitudes: the coordinates of U on the canonical functions, C_ij = E[u_i(x) U_j(x)],
    # are a_i q_iᵀ with q orthonormal, so C Cᵀ = diag(a²)
    C = u_cca[:, :k].T @ (px[:, None] * U.detach())
    torch.testing.assert_close(C @ C.T, torch.diag(peira.peira_filter(s[:k], lam).square()), atol=1e-7, rtol=0)
    D = v_cca[:, :k].T @ (py[:, None] * V.detach())
    torch.testing.assert_close(D, C, atol=1e-7, rtol=0)  # V uses the same q_i and amplitudes


# -----------------------------------------------------------------------------
# the running-moment module

def test_running_moments():
    u1, v1 = random_pair(32, 5, seed=6)
    u2, v2 = random_pair(32, 5, seed=7)
    for center in (False, True):
        loss_fn = peira.PEIRALoss(5, lam=0.3, eta=1.0, center=center).double()
        loss_fn(u2, v2); loss_fn(u1, v1)
        N1, S1 = peira.moments(u1, v1, center)
        torch.testing.assert_close(loss_fn.N, N1)
        torch.testing.assert_close(loss_fn.S, S1)
        P1, Q1 = peira.optimal_regressor(N1, S1, 0.3)
        torch.testing.assert_close(loss_fn.P, P1)
        torch.testing.assert_close(loss_fn.Q, Q1)
        assert abs(loss_fn.objective() - peira.peira_objective(u1, v1, 0.3, center).item()) < 1e-12
        # eta = 0.25: the first batch initialises, the second is mixed in with weight 0.25
        loss_fn = peira.PEIRALoss(5, lam=0.3, eta=0.25, center=center).double()
        loss_fn(u1, v1); loss_fn(u2, v2)
        N2, S2 = peira.moments(u2, v2, center)
        torch.testing.assert_close(loss_fn.N, 0.75 * N1 + 0.25 * N2)
        torch.testing.assert_close(loss_fn.S, 0.75 * S1 + 0.25 * S2)
        assert loss_fn.steps.item() == 2


def test_running_moments_state_dict_and_eval_mode():
    u, v = random_pair(32, 4, seed=8)
    a = peira.PEIRALoss(4, lam=0.2, eta=0.5)
    a(u.float(), v.float()); a(v.float(), u.float())
    b = peira.PEIRALoss(4, lam=0.2, eta=0.5)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.P, a.P)
    assert b.steps.item() == 2
    b.eval()
    N_before = b.N.clone()
    b(u.float(), v.float())
    torch.testing.assert_close(b.N, N_before)  # eval mode does not update the moments


def test_stats_against_direct_computations():
    u, v = random_pair(256, 6, seed=9)
    loss_fn = peira.PEIRALoss(6, lam=0.4, eta=1.0).double()
    loss_fn(u, v)
    st = loss_fn.stats()
    N, S = peira.moments(u, v)
    P, _ = peira.optimal_regressor(N, S, 0.4)
    assert abs(st["objective"] - peira.peira_objective(u, v, 0.4).item()) < 1e-12
    assert abs(st["trace_P"] - torch.trace(P).item()) < 1e-12
    eig = torch.linalg.eigvalsh(N)
    p = eig / eig.sum()
    assert abs(st["rank_N"] - torch.exp(-(p * p.log()).sum()).item()) < 1e-9
    assert abs(st["alignment"] - (torch.dot(P.flatten(), S.flatten()) / P.norm() / S.norm()).item()) < 1e-12
    std = ((u.var(0, unbiased=False) + v.var(0, unbiased=False)) / 2).sqrt().mean().item()
    assert abs(st["embedding_std"] - std) < 1e-6
    assert abs(peira.effective_rank(torch.eye(7)) - 7) < 1e-9


# -----------------------------------------------------------------------------
# two processes (gloo) against one process on the concatenated batch

class TwoEncoders(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.U, self.V = nn.Linear(d, k), nn.Linear(d, k)

    def forward(self, x, y):
        return self.U(x), self.V(y)


def train_steps(model, loss_fn, batches):
    """Two SGD steps; returns per step (P, Q, loss, gradients of U and V)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for x, y in batches:
        loss = loss_fn(*model(x, y))
        opt.zero_grad()
        loss.backward()
        out.append({"P": loss_fn.P, "Q": loss_fn.Q, "loss": loss.detach(),
                    "grads": [p.grad.clone() for p in model.parameters()]})
        opt.step()
    return out


def make_problem(center):
    torch.manual_seed(0)
    model = TwoEncoders(5, 3).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 5, generator=g, dtype=F64), torch.randn(16, 5, generator=g, dtype=F64))
               for _ in range(2)]
    return model, peira.PEIRALoss(3, lam=0.3, eta=0.6, center=center).double(), batches


def _distributed_worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for center in (False, True):
        model, loss_fn, batches = make_problem(center)
        ddp = nn.parallel.DistributedDataParallel(model)
        local = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        results[center] = train_steps(ddp, loss_fn, local)
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_concatenated_batch():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_distributed_worker, args=(2, free_port(), folder), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    for center in (False, True):
        model, loss_fn, batches = make_problem(center)
        single = train_steps(model, loss_fn, batches)
        for step, ref in enumerate(single):
            for rank in ranks:
                got = rank[center][step]
                torch.testing.assert_close(got["P"], ref["P"], rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(got["Q"], ref["Q"], rtol=1e-12, atol=1e-12)
                for g_got, g_ref in zip(got["grads"], ref["grads"]):  # after DDP averaging
                    torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)
            # each rank returns the loss of its half; their mean is the loss of the whole batch
            mean_loss = (ranks[0][center][step]["loss"] + ranks[1][center][step]["loss"]) / 2
            torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-12, atol=1e-12)


# -----------------------------------------------------------------------------
# bad input

def test_bad_input_raises_clear_errors():
    u, v = random_pair(8, 3, seed=0)
    for lam in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            peira.PEIRALoss(3, lam=lam)
        with pytest.raises(ValueError, match="lam"):
            peira.peira_objective(u, v, lam)
        with pytest.raises(ValueError, match="lam"):
            peira.optimal_regressor(*peira.moments(u, v), lam)
    with pytest.raises(ValueError, match="shape"):
        peira.moments(u, v[:, :2])
    with pytest.raises(ValueError, match="shape"):
        peira.peira_objective(u, v[:7], 0.1)
    with pytest.raises(ValueError, match="shape"):
        peira.moments(u[None], v[None])
    with pytest.raises(ValueError, match="batch size 1"):
        peira.PEIRALoss(3)(u[:1], v[:1])
    with pytest.raises(ValueError, match="dim 3"):
        peira.PEIRALoss(4)(u, v)
    with pytest.raises(ValueError, match="eta"):
        peira.PEIRALoss(3, eta=1.5)(u, v)
    loss_fn = peira.PEIRALoss(3).double()
    loss_fn(u, v)
    bad = v.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 1: v has 1 non-finite"):
        loss_fn(u, bad)
    assert loss_fn.steps.item() == 1 and torch.isfinite(loss_fn.N).all()  # nothing was updated
    with pytest.raises(RuntimeError, match="no running moments"):
        peira.PEIRALoss(3).eval()(u.float(), v.float())
    J = random_joint(3, 3, seed=0)
    with pytest.raises(ValueError, match="negative"):
        peira.nonlinear_cca(J - 0.2 * torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="sum to 1"):
        peira.nonlinear_cca(2 * J)
    with pytest.raises(ValueError, match="zero probability"):
        peira.nonlinear_cca(torch.tensor([[0.5, 0.0], [0.5, 0.0]], dtype=F64))


def test_every_tensor_follows_the_inputs_device_and_dtype():
    """On the meta device a tensor created on the CPU fails the first operation it meets, so
    this finds every torch.eye / zeros / tensor that ignores the inputs' device (CUDA inputs
    fail the same way). Functions that read values (.item()) cannot run on meta."""
    meta = torch.device("meta")
    for dtype in (torch.float32, F64):
        u, v = torch.randn(16, 4, device=meta, dtype=dtype), torch.randn(16, 4, device=meta, dtype=dtype)
        N, S = peira.moments(u, v, center=True)
        P, Q = peira.optimal_regressor(N, S, 0.1)
        outs = [N, S, P, Q, peira.peira_objective(u, v, 0.1), peira.aux_loss(u, v, P, Q, 0.1)]
        outs += list(peira.linear_cca(u, torch.randn(16, 3, device=meta, dtype=dtype), eps=1e-3))
        outs += [peira.peira_filter(u[:, 0], 0.1), peira.simsiam_filter(u[:, 0], 0.1)]
        for out in outs:
            assert out.device == meta and out.dtype == dtype, (out.device, out.dtype)


# -----------------------------------------------------------------------------
# bench.py and requirements.txt

def test_bench_rejects_an_unknown_loss(capsys):
    import bench
    with pytest.raises(SystemExit) as exc:
        bench.main(["--losses", "peira,simclr"])
    assert exc.value.code == 2 and "unknown 'simclr'" in capsys.readouterr().err


def test_requirements_lower_bounds_cover_the_apis_used():
    """torchvision.io.decode_image(path) (train_imagenet.read_rgb) exists from torchvision 0.20,
    which needs torch 2.5: the lower bounds must not promise older versions."""
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "requirements.txt")) as fh:
        bounds = dict(re.findall(r"^([a-z]+)>=([0-9.]+)", fh.read(), re.M))
    version = lambda text: tuple(int(x) for x in text.split(".")[:2])  # noqa: E731
    assert version(bounds["torchvision"]) >= (0, 20) and version(bounds["torch"]) >= (2, 5), bounds


# -----------------------------------------------------------------------------
# simsiam_dynamics.py, reduced

def test_simsiam_dynamics_reduced(tmp_path, monkeypatch):
    import json
    import simsiam_dynamics as sd
    monkeypatch.setattr(sd, "GRAD_REPEATS", 100)
    results = sd.main(["--starts", "4", "--out", str(tmp_path)])
    rows = [r for sec in (1, 2, 3, 4) for r in results[f"section{sec}"]["rows"]]
    failed = [r["claim"] for r in rows if r["pass"] is False]
    assert not failed, failed
    # the errors the theory makes exact, asserted here too, and the normalisation found
    sec2, sec3 = results["section2"], results["section3"]
    assert sec2["amplitude_error"] < 1e-6 and sec2["normalisation"] == "f"
    assert max(abs(L - sec3["L_star"]) for L in sec3["L_end"]) < 1e-8
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["all_passed"] and saved["section3"]["L_star"] == sec3["L_star"]
    for name in ("lyapunov.png", "collapse.png", "amplitudes.png", "objective_vs_alignment.png"):
        assert (tmp_path / name).stat().st_size > 10_000


# -----------------------------------------------------------------------------
# train_cifar.py on a small fake CIFAR-10 in torchvision's on-disk format

def make_fake_cifar(root, n_train=640, n_test=320, seed=0):
    """cifar-10-batches-py/{data_batch_1..5, test_batch}: pickled dicts of uint8 rows (N, 3072)
    and labels; images are noisy class-coloured squares so that accuracy means something."""
    import pickle
    import numpy as np
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (10, 3, 1, 1))
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def batch(n):
        labels = rng.integers(0, 10, n)
        imgs = np.clip(colours[labels] + rng.normal(0, 40, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
        return {"data": imgs.reshape(n, -1), "labels": labels.tolist()}

    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(batch(n), fh)
    return root


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    return make_fake_cifar(str(tmp_path_factory.mktemp("cifar")))


def cifar_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--tiny", "--subset", "128", "--batch-size", "64",
            "--workers", "0", *extra]


def read_jsonl(path):
    import json
    with open(path) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("loss", ["peira", "peira_direct", "simsiam", "vicreg"])
def test_train_cifar_two_steps_of_each_loss(fake_cifar, tmp_path, loss):
    import train_cifar
    history = train_cifar.main(cifar_args(fake_cifar, tmp_path, "--loss", loss, "--epochs", "1"))
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in steps] == [0, 1] and all(math.isfinite(r["loss"]) for r in steps)
    assert 0 <= history[-1]["knn"] <= 1 and math.isfinite(history[-1]["objective"])
    assert (tmp_path / "results.json").exists() and (tmp_path / "objective_vs_knn.png").exists()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["loss"] == loss


def test_train_cifar_resume_continues_exactly(fake_cifar, tmp_path):
    import train_cifar
    train_cifar.main(cifar_args(fake_cifar, tmp_path / "straight", "--epochs", "2"))
    train_cifar.main(cifar_args(fake_cifar, tmp_path / "resumed", "--epochs", "2", "--stop-after", "1"))
    train_cifar.main(cifar_args(fake_cifar, tmp_path / "resumed", "--epochs", "2", "--resume"))
    straight = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "step" in r]
    resumed = [r for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"] and a["eta"] == b["eta"], (a, b)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    torch.testing.assert_close(a["monitor"]["N"], b["monitor"]["N"], rtol=0, atol=0)


def test_train_cifar_eval_mode(fake_cifar, tmp_path):
    import train_cifar
    train_cifar.main(cifar_args(fake_cifar, tmp_path, "--epochs", "1"))
    res = train_cifar.main(["--data", fake_cifar, "--eval", str(tmp_path / "ckpt.pt"), "--probe-epochs", "3"])
    assert 0 <= res["linear_top1"] <= res["linear_top5"] <= 1 and res["epoch"] == 1


def test_train_cifar_two_processes(fake_cifar, tmp_path):
    """torchrun, gloo: the script itself asserts that both ranks hold identical running moments."""
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_cifar.py", *cifar_args(fake_cifar, tmp_path, "--epochs", "1")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "step" in r]
    assert len(steps) == 2  # 128 images, global batch 64: each rank ran 2 steps of 32
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 1


def test_train_cifar_bad_input(fake_cifar, tmp_path):
    import train_cifar
    with pytest.raises(SystemExit, match="CIFAR-10 not found at .*nowhere"):
        train_cifar.main(cifar_args(str(tmp_path / "nowhere"), tmp_path, "--epochs", "1"))
    with pytest.raises(SystemExit):
        train_cifar.main(cifar_args(fake_cifar, tmp_path, "--lam", "-1"))
    # a diverging run stops at the step that produced a non-finite value and saves nothing
    with pytest.raises(FloatingPointError, match="step"):
        train_cifar.main(cifar_args(fake_cifar, tmp_path / "nan", "--epochs", "1", "--optimizer", "sgd",
                                    "--lr", "1e30", "--clip", "0", "--warmup-epochs", "0"))
    assert not (tmp_path / "nan" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# train_imagenet.py on a tiny ImageFolder of generated JPEGs

@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    import torchvision
    root = tmp_path_factory.mktemp("imagenet")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, colour in enumerate(([200, 40, 40], [40, 40, 200])):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = (torch.tensor(colour).view(3, 1, 1) + 30 * torch.randn(3, 40, 48, generator=g)).clamp(0, 255)
                torchvision.io.write_jpeg(img.to(torch.uint8), str(folder / f"{i}.JPEG"))
    return str(root)


def imagenet_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--image-size", "32", "--proj", "64-64-32",
            "--batch-size", "16", "--workers", "0", "--no-bf16", "--warmup-epochs", "1", *extra]


def test_train_imagenet_two_ranks_hold_the_moments_of_the_concatenated_batch(tiny_imagefolder, tmp_path):
    """torchrun, 2 ranks (gloo): after the first step (η = 1) the running moments are the moments
    of the global batch; recomputed here in one process from the same images, views and weights.
    The script asserts that both ranks hold identical moments."""
    import subprocess
    import sys
    import train_imagenet as ti
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_imagenet.py", *imagenet_args(tiny_imagefolder, tmp_path, "--epochs", "1")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)
    model = ti.build_model("64-64-32").to(memory_format=torch.channels_last)  # as in the script
    dataset = ti.TwoViews(os.path.join(tiny_imagefolder, "train"), 32, seed=0)
    us, vs = [], []
    for rank in range(2):  # each rank's 8 images, through the same initial weights (local BN on CPU)
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, 2, rank, seed=0, drop_last=True)
        items = [dataset[i] for i in list(sampler)[:8]]
        x1, x2 = (torch.stack([t[j] for t in items]).contiguous(memory_format=torch.channels_last) for j in (0, 1))
        _, z = ti.embed(model, x1, x2)
        us.append(z.chunk(2)[0].detach()); vs.append(z.chunk(2)[1].detach())
    N, S = peira.moments(torch.cat(us), torch.cat(vs))
    # float32 ResNet-50 with batch norm over 8 images: agreement to ~1e-4 relative; the moments
    # of one rank's half alone are off by more than 1e-2, so the check discriminates
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert rel(ckpt["peira"]["N"], N) < 1e-3 and rel(ckpt["peira"]["S"], S) < 1e-3
    assert rel(peira.moments(us[0], vs[0])[0], N) > 1e-2
    P, Q = peira.optimal_regressor(ckpt["peira"]["N"], ckpt["peira"]["S"], 0.1)
    P_ref, Q_ref = peira.optimal_regressor(N, S, 0.1)
    assert rel(P, P_ref) < 1e-3 and rel(Q, Q_ref) < 1e-3


def test_train_imagenet_resume_and_eval(tiny_imagefolder, tmp_path):
    import train_imagenet as ti
    common = imagenet_args(tiny_imagefolder, tmp_path / "straight", "--epochs", "2", "--batch-size", "8")
    ti.main(common)
    resumed = imagenet_args(tiny_imagefolder, tmp_path / "resumed", "--epochs", "2", "--batch-size", "8")
    ti.main(resumed + ["--stop-after", "1"])
    ti.main(resumed)  # the checkpoint in --out is picked up, as after a preemption
    a = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "step" in r]
    b = [r for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in b] == [0, 1, 2, 3] and [r["loss"] for r in a] == [r["loss"] for r in b]
    res = ti.main(imagenet_args(tiny_imagefolder, tmp_path, "--eval", str(tmp_path / "resumed" / "ckpt.pt"),
                                "--probe-epochs", "2", "--probe-batch", "8"))
    assert 0 <= res["top1"] <= res["top5"] <= 1 and res["epoch"] == 2
    with pytest.raises(SystemExit, match="train not found"):
        ti.main(imagenet_args(str(tmp_path / "nowhere"), tmp_path))


# -----------------------------------------------------------------------------
# two_rooms.py and plan.py

def test_two_rooms_dynamics_and_rendering():
    import two_rooms as tr
    right = torch.full((20,), 3)
    blocked = torch.tensor([[27.0, 40.0]])
    for a in right:  # the wall blocks
        blocked = tr.move(blocked, a)
    assert blocked[0, 0] < tr.WALL_X - tr.WALL_HALF and blocked[0, 1] == 40.0
    through = torch.tensor([[27.0, tr.DOOR_Y]])
    for a in right:  # the door passes, the border blocks
        through = tr.move(through, a)
    assert through[0, 0] > tr.ARENA - tr.BORDER - tr.MARGIN - tr.STEP and through[0, 0] <= tr.ARENA - tr.BORDER - tr.MARGIN
    up = tr.move(torch.tensor([[10.0, 6.0]]), torch.tensor([0]))
    assert torch.equal(up, torch.tensor([[10.0, 6.0]]))  # border above
    obs = tr.render(torch.tensor([[21.0, 41.0], [51.0, 13.0]]), 32)  # pixel centres: 2i + 1
    assert obs.shape == (2, 2, 32, 32) and obs.min() >= 0 and obs.max() <= 1
    peak = obs[:, 0].flatten(1).argmax(1)
    assert (peak // 32).tolist() == [20, 6] and (peak % 32).tolist() == [10, 25]  # row from y, column from x
    walls = obs[0, 1]
    assert walls[:, 16].sum() > 20 and walls[5, 16] == 0 and walls[20, 16] == 1  # wall column, door rows open
    env = tr.TwoRooms(res=32)
    o, info = env.reset(seed=3)
    o2, reward, terminated, truncated, info2 = env.step(3)
    assert o.shape == o2.shape == (2, 32, 32) and reward in (0.0, 1.0) and not truncated


def test_two_rooms_data_is_cached_and_has_no_crossings_when_asked(tmp_path):
    import two_rooms as tr
    args = tr.parser.parse_args(["--out", str(tmp_path), "--trajectories", "200", "--length", "16"])
    pos, actions = tr.load_data(args)
    assert pos.shape == (200, 17, 2) and actions.shape == (200, 16)
    assert torch.equal(tr.move(pos[:, :-1], actions), pos[:, 1:])  # the positions follow the dynamics
    assert tr.free(pos).all() and len(list(tmp_path.glob("data_*.pt"))) == 1
    again, _ = tr.load_data(args)
    assert torch.equal(pos, again)
    args.no_door_data = True
    nodoor, _ = tr.load_data(args)
    assert tr.crossing_fraction(nodoor) == 0 and len(nodoor) < 200


@pytest.mark.parametrize("loss", ["peira", "pldm", "lewm"])
def test_each_world_model_loss_decreases_on_a_small_batch(loss):
    import two_rooms as tr
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    pos, actions = tr.random_trajectories(32, 12, seed=0, no_door=False)
    p, a = tr.sample_windows(pos, actions, 16, 4, gen)
    obs = tr.render(p, 16)
    model = tr.WorldModel(16, 8)
    idm = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    peira_loss = peira.PEIRALoss(8, lam=0.1, eta=1.0)
    opt = torch.optim.Adam([*model.parameters(), *idm.parameters()], lr=3e-3)

    def measure():  # PEIRA's aux loss is not its objective: measure the objective itself
        if loss != "peira":
            return tr.world_model_loss(loss, model, obs, a, peira_loss, idm, torch.Generator().manual_seed(1))[0].item()
        z = model.encode(obs)
        return peira.peira_objective(model.rollout(z[:, 0], a).reshape(-1, 8), z[:, 1:].reshape(-1, 8), 0.1).item()

    before = measure()
    for _ in range(40):
        value, _ = tr.world_model_loss(loss, model, obs, a, peira_loss, idm, gen)
        opt.zero_grad()
        value.backward()
        opt.step()
    assert measure() < before


def test_planning_with_the_true_model_reaches_every_goal():
    import argparse
    import plan
    import two_rooms as tr
    starts, goals = tr.start_goal_pairs(6, 7)
    field = plan.DistanceField(starts, goals)
    args = argparse.Namespace(horizon=8, samples=64, elites=8, iters=2)
    gen = torch.Generator().manual_seed(0)
    success, steps, _, _ = plan.run_episodes(lambda pos, ep: plan.cem(plan.true_cost(field, pos, ep), len(pos), args, gen), starts, goals)
    assert success.all()
    oracle_success, oracle_steps, _, _ = plan.run_episodes(lambda pos, ep: plan.oracle_action(field, pos, ep), starts, goals)
    assert oracle_success.all() and torch.equal(oracle_steps.float(), field(starts[:, None], torch.arange(6))[:, 0])
    assert (steps >= oracle_steps).all()  # nothing beats the shortest path


def test_two_rooms_and_plan_end_to_end(tmp_path):
    import plan
    import two_rooms as tr
    tr.main(["--out", str(tmp_path), "--steps", "4", "--trajectories", "64", "--res", "16", "--batch-size", "8"])
    assert all((tmp_path / f"{name}.pt").exists() and (tmp_path / f"{name}.png").exists() for name in ("peira", "pldm", "lewm"))
    rows = plan.main(["--models", str(tmp_path), "--episodes", "4", "--out", str(tmp_path / "plan"),
                      "--samples", "16", "--elites", "4", "--iters", "1", "--horizon", "4"])
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["oracle (shortest path)", "random"] and len(methods) == 5
    assert rows[0]["success"] == 1.0 and (tmp_path / "plan" / "plan.json").exists()
    assert (tmp_path / "plan" / "trajectories.png").exists()
