"""Tests: every number is checked against an independent computation (float64 autograd, least
squares, closed forms, a second implementation, one process against two).

    python -m pytest -q test_peira.py

Part 1 is the specification of the core, peira.py: read it to learn what each function promises.
Part 2 runs the scripts end to end on small data made here (no network).
"""
import datetime
import doctest
import json
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import bench
import bench_images
import peira
import plan
import simsiam_dynamics as sd
import train_cifar as tc
import train_imagenet as ti
import two_rooms as tr

# =============================================================================
# PART 1. peira.py, the specification of the core
# =============================================================================

F64 = torch.float64


def random_pair(n, k, seed, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, k, generator=g, dtype=F64)
    mix = torch.randn(k, k, generator=g, dtype=F64) / k ** 0.5
    v = u @ mix + noise * torch.randn(n, k, generator=g, dtype=F64)
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


@pytest.mark.parametrize("k,lam", [(1, 0.3), (5, 0.05), (16, 0.7)])
def test_aux_loss_from_moments_equals_the_explicit_formula(k, lam):
    """The training path (one Cholesky factor, solves) against aux_loss with P and Q formed, in
    float64 (value and gradient) and in float32 under bf16 autocast."""
    u, v = random_pair(40, k, seed=k)
    N, S = peira.moments(u, v)
    N, S = N + 0.1 * torch.eye(k, dtype=F64), S * 0.9  # moments of other batches (running ones)
    P, Q = peira.optimal_regressor(N, S, lam)
    u.requires_grad_(True); v.requires_grad_(True)
    explicit = peira.aux_loss(u, v, P, Q, lam)
    solved = peira.aux_loss_from_moments(u, v, N, S, lam)
    torch.testing.assert_close(solved, explicit, rtol=1e-12, atol=1e-12)
    grads = zip(torch.autograd.grad(solved, (u, v)), torch.autograd.grad(explicit, (u, v)))
    for g_solved, g_explicit in grads:
        torch.testing.assert_close(g_solved, g_explicit, rtol=1e-10, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ub, vb = u.float() @ torch.eye(k), v.float() @ torch.eye(k)  # bf16 under autocast
        loss = peira.aux_loss_from_moments(ub, vb, N.float(), S.float(), lam)
    assert loss.dtype == torch.float32
    ref = peira.aux_loss(ub.double(), vb.double(), P, Q, lam)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    grad_bf16, grad_ref = torch.autograd.grad(loss, ub)[0], torch.autograd.grad(ref, ub)[0]
    torch.testing.assert_close(grad_bf16.double(), grad_ref.double(), rtol=1e-2, atol=1e-4)  # bf16 grads


def test_peira_loss_step_has_no_host_sync(monkeypatch):
    """A training step of PEIRALoss never reads a tensor's value on the host (.item(), bool(),
    float(), ...), which on a GPU would stall the step: every conversion of a tensor to a Python
    value raises here. On CUDA the same is checked with torch.cuda.set_sync_debug_mode."""
    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the training step")
    peira_loss = peira.PEIRALoss(6, lam=0.3, eta=0.6)
    u, v = (torch.randn(16, 6, requires_grad=True) for _ in range(2))
    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
            patch.setattr(torch.Tensor, name, refuse)
        for step in range(3):
            peira_loss.eta = 0.8 - 0.1 * step
            peira_loss(u, v).backward()
            peira_loss.update(u.detach(), v.detach(), all_reduce=False)
    assert peira_loss.steps.item() == 6  # and the test itself can see a value again
    if torch.cuda.is_available():
        cuda_loss = peira.PEIRALoss(6, lam=0.3).cuda()
        x, y = u.detach().cuda(), v.detach().cuda()
        cuda_loss(x, y)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cuda_loss.eta = 0.7
            cuda_loss(x.requires_grad_(), y).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_peira_loss_compiles_once_with_eta_changing_every_step():
    """η is a buffer: torch.compile does not specialise on it (a Python float attribute would
    recompile the step, or break the graph, every time η changes)."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    peira_loss = peira.PEIRALoss(4, lam=0.3, eta=0.8)
    step = torch.compile(lambda u, v: peira_loss(u, v), backend="eager", fullgraph=False)
    u, v = random_pair(16, 4, seed=3)
    reference = peira.PEIRALoss(4, lam=0.3, eta=0.8)
    for i in range(4):
        peira_loss.eta = reference.eta = 0.8 - 0.1 * i
        torch.testing.assert_close(step(u.float(), v.float()), reference(u.float(), v.float()))
    torch.testing.assert_close(peira_loss.N, reference.N)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_running_moments_stay_float32_whatever_dtype_the_module_gets():
    peira_loss = peira.PEIRALoss(4, lam=0.3).to(torch.bfloat16)
    assert peira_loss.N.dtype == peira_loss.S.dtype == peira_loss.eta.dtype == torch.float32
    assert peira_loss.steps.dtype == torch.long
    u, v = random_pair(64, 4, seed=2)
    loss = peira_loss(u.bfloat16(), v.bfloat16())
    assert loss.dtype == torch.float32 and peira_loss.N.dtype == torch.float32
    torch.testing.assert_close(peira_loss.N, peira.moments(u.bfloat16().float(), v.bfloat16().float())[0])
    assert peira_loss.half().N.dtype == torch.float32 and peira_loss.double().N.dtype == F64


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
    x = torch.cat([z, torch.randn(500, 2, generator=g, dtype=F64)], 1)
    x = x @ torch.randn(5, 5, generator=g, dtype=F64)
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
    # Both roots of f² − sf + λ = 0 pass the checks above; the filter must give the stable one.
    # The flow on one canonical direction φ (simsiam_dynamics.simsiam_field with U = fφ, using
    # E[φ(y) | x] = sφ(x)) is df/dt = g(f) = −f(p² − sp + λ): stable where g'(f) < 0.
    def g(f, s):
        p = f.square() * s / (f.square() + lam)
        return -f * (p.square() - s * p + lam)

    def slope(f, s, h=1e-6):
        return (g(f + h, s) - g(f - h, s)) / (2 * h)
    other = (sa - (sa.square() - 4 * lam).sqrt()) / 2  # the other root
    assert len(fa) == 2 and (sa.square() > 4 * lam).all()  # two simple roots each
    torch.testing.assert_close(g(fa, sa), torch.zeros_like(fa), atol=1e-12, rtol=0)
    assert (slope(fa, sa) < -1e-3).all() and (slope(other, sa) > 1e-3).all()


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
    peira_loss = peira.PEIRALoss(k, lam=lam, eta=1.0).double()
    for _ in range(3000):
        loss = peira_loss(*population_samples(J, U, V))
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
    amplitudes = peira.peira_filter(s[:k], lam)
    torch.testing.assert_close(C @ C.T, torch.diag(amplitudes.square()), atol=1e-7, rtol=0)
    D = v_cca[:, :k].T @ (py[:, None] * V.detach())
    torch.testing.assert_close(D, C, atol=1e-7, rtol=0)  # V uses the same q_i and amplitudes


# -----------------------------------------------------------------------------
# the running-moment module

def test_running_moments():
    u1, v1 = random_pair(32, 5, seed=6)
    u2, v2 = random_pair(32, 5, seed=7)
    for center in (False, True):
        peira_loss = peira.PEIRALoss(5, lam=0.3, eta=1.0, center=center).double()
        peira_loss(u2, v2); peira_loss(u1, v1)
        N1, S1 = peira.moments(u1, v1, center)
        torch.testing.assert_close(peira_loss.N, N1)
        torch.testing.assert_close(peira_loss.S, S1)
        P1, Q1 = peira.optimal_regressor(N1, S1, 0.3)
        torch.testing.assert_close(peira_loss.P, P1)
        torch.testing.assert_close(peira_loss.Q, Q1)
        assert abs(peira_loss.objective() - peira.peira_objective(u1, v1, 0.3, center).item()) < 1e-12
        # eta = 0.25: the first batch initialises, the second is mixed in with weight 0.25
        peira_loss = peira.PEIRALoss(5, lam=0.3, eta=0.25, center=center).double()
        peira_loss(u1, v1); peira_loss(u2, v2)
        N2, S2 = peira.moments(u2, v2, center)
        torch.testing.assert_close(peira_loss.N, 0.75 * N1 + 0.25 * N2)
        torch.testing.assert_close(peira_loss.S, 0.75 * S1 + 0.25 * S2)
        assert peira_loss.steps.item() == 2


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
    peira_loss = peira.PEIRALoss(6, lam=0.4, eta=1.0).double()
    peira_loss(u, v)
    st = peira_loss.stats()
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
    # canonical correlations (signed: an anti-correlated pair is negative): the generalised
    # eigenvalues S w = s N w; their absolute values = linear CCA of the symmetrised, sign-flipped
    # data (exact zero mean, so centered CCA = the uncentered moments N/2, S/2)
    corr = torch.linalg.eigvals(torch.linalg.solve(N, S)).real.sort(descending=True).values
    assert torch.allclose(peira.canonical_correlations(N, S), corr, atol=1e-10) and corr.min() < 0
    x, y = torch.cat([u, v, -u, -v]), torch.cat([v, u, -v, -u])
    assert torch.allclose(corr.abs().sort(descending=True).values, peira.linear_cca(x, y)[0], atol=1e-10)
    assert abs(st["median_corr"] - corr[corr > 0].median().item()) < 1e-10
    assert st["kept"] == (corr > 0.4 ** 2).sum().item() / 6 and 0 < st["kept"] < 1  # directions above λ²
    assert peira.canonical_correlations(N.float(), S.float()).dtype == torch.float32
    fresh = peira.PEIRALoss(3, lam=0.3).stats()  # N = 0: no span, no correlation
    assert math.isnan(fresh["median_corr"]) and fresh["kept"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_canonical_correlations_separate_signal_from_their_null(seed):
    """4096 pairs, k 64: independent views read at most the shuffled pairs' level (+ 0.02), and views
    with 8 truly correlated directions (0.35 to 0.9, mixed by a random rotation, each view with its own
    noise and offset) show exactly 8 above it. The running moments' spectrum, read without a null,
    would count dozens of directions on the same independent views (the diagnostic this replaces)."""
    n, k = 4096, 64
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(n, k, generator=g, dtype=F64) + 3, torch.randn(n, k, generator=g, dtype=F64) - 1
    corr, null = peira.canonical_correlations_with_null(u, v, torch.Generator().manual_seed(seed))
    assert corr[0] <= null[0] + 0.02 and (corr > null[0]).sum() <= 1
    assert 0.1 < null[0] < 0.35  # ≈ 2√(k/n) = 0.25: the level noise reaches
    rho = torch.linspace(0.35, 0.9, 8, dtype=F64)
    common = torch.randn(n, 8, generator=g, dtype=F64)
    planted_u, planted_v = u.clone(), v.clone()
    planted_u[:, :8] = common + torch.randn(n, 8, generator=g, dtype=F64) * ((1 - rho) / rho).sqrt()
    planted_v[:, :8] = common + torch.randn(n, 8, generator=g, dtype=F64) * ((1 - rho) / rho).sqrt()
    rotation = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))[0]
    corr, null = peira.canonical_correlations_with_null(planted_u @ rotation, planted_v @ rotation,
                                                        torch.Generator().manual_seed(seed))
    assert (corr > null[0]).sum() == 8
    torch.testing.assert_close(corr[:8].flip(0), rho, atol=0.05, rtol=0)
    # the statistic on 256 pairs (a batch's worth) reads noise as correlation
    small = peira.canonical_correlations(*peira.moments(u[:256], v[:256], center=True))
    assert (small > 0.3).sum() > 10


def test_lam_keeping_is_the_largest_lam_that_keeps_the_share():
    """Brute force over a λ grid (step 1e-4): the largest λ at which PEIRA's rule s > λ² keeps at least
    the share of the correlations sits just below lam_keeping, for several spectra and shares."""
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(0, 1 + 1e-9, 1e-4, dtype=F64)
    for n in (1, 2, 5, 28):
        corr = torch.rand(n, generator=g, dtype=F64).sort(descending=True).values
        for share in (0.25, 0.5, 1.0):
            keeps = (corr[None] > grid[:, None] ** 2).sum(1) >= share * n
            assert 0 < tc.lam_keeping(corr, share) - grid[keeps].max() <= 1e-4
    assert math.isnan(tc.lam_keeping(torch.zeros(0, dtype=F64), 0.5))


def test_view_correlations_of_collapsed_embeddings_read_no_direction():
    """A projector that maps every image to one point (PEIRA at a λ above every correlation can end
    there): train_cifar's per-epoch diagnostic reports no direction instead of failing."""
    torch.manual_seed(0)
    model = tc.SSLModel("peira", 4, [8, 8])
    last = model.projector[-1]
    nn.init.zeros_(last.weight)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    stats = tc.view_correlations(model, images, 0.7, 0, 0, torch.device("cpu"), 0, 1)
    assert (stats["signal_dims"], stats["kept_dims"], stats["corr_top"]) == (0, 0, 0.0)
    assert math.isnan(stats["null_level"])
    nn.init.normal_(last.weight)  # the same images with a live projector: directions to read
    stats = tc.view_correlations(model, images, 0.7, 0, 0, torch.device("cpu"), 0, 1)
    assert not math.isnan(stats["null_level"])


# -----------------------------------------------------------------------------
# two processes (gloo) against one process on the concatenated batch

class TwoEncoders(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.U, self.V = nn.Linear(d, k), nn.Linear(d, k)

    def forward(self, x, y):
        return self.U(x), self.V(y)


def train_steps(model, peira_loss, batches):
    """Two SGD steps; returns per step (P, Q, loss, gradients of U and V)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for x, y in batches:
        loss = peira_loss(*model(x, y))
        opt.zero_grad()
        loss.backward()
        out.append({"P": peira_loss.P, "Q": peira_loss.Q, "loss": loss.detach(),
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


def monitor_moments(batches):
    """N, S of a monitor fed with update(all_reduce=False) at η 0.6 then 0.3, averaged over the ranks
    at the end (linear in the batch moments: those of the global batches)."""
    monitor = peira.PEIRALoss(5, lam=0.3, eta=0.6).double()
    for eta, (x, y) in zip((0.6, 0.3), batches):
        monitor.eta = eta
        monitor.update(x, y, all_reduce=False)
    monitor.all_reduce_moments()
    return monitor.N, monitor.S


def _distributed_worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for center in (False, True):
        model, peira_loss, batches = make_problem(center)
        ddp = nn.parallel.DistributedDataParallel(model)
        local = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
        results[center] = train_steps(ddp, peira_loss, local)
    results["monitor"] = monitor_moments(local)  # the last problem's batches
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
        model, peira_loss, batches = make_problem(center)
        single = train_steps(model, peira_loss, batches)
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
    single = monitor_moments(make_problem(True)[2])  # one process on the whole batches
    for got, other, ref in zip(ranks[0]["monitor"], ranks[1]["monitor"], single):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        assert torch.equal(got, other)


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
        peira.PEIRALoss(3, eta=1.5)
    peira_loss = peira.PEIRALoss(3).double()
    with pytest.raises(ValueError, match="eta"):
        peira_loss.eta = 0.0
    peira_loss(u, v)
    N_before = peira_loss.N.clone()
    bad = v.clone()
    bad[2, 1] = float("nan")
    # a non-finite batch (no host sync to raise): NaN loss, the moments untouched, the step counted
    assert torch.isnan(peira_loss(u, bad)) and torch.isnan(peira_loss(u, -bad))
    assert torch.equal(peira_loss.N, N_before) and peira_loss.steps.item() == 1
    assert peira_loss.stats()["non_finite_steps"] == 2
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


# =============================================================================
# PART 2. the scripts, end to end
# =============================================================================

# -----------------------------------------------------------------------------
# bench.py and requirements.txt

def test_bench_runs_every_loss_and_rejects_an_unknown_one(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--losses", "peira,simclr"])
    assert exc.value.code == 2 and "unknown 'simclr'" in capsys.readouterr().err
    rows = bench.main(["--tables", "step", "--width", "8", "--batch-size", "4", "--proj", "16-8", "--steps",
                       "2", "--warmup", "0"])["step"]
    assert [r["loss"] for r in rows] == ["peira", "peira_direct", "simsiam", "vicreg"]
    assert all(r["step_ms"] > r["loss_ms"] > 0 for r in rows)
    assert math.isnan(rows[0]["monitor_share"]) and all(0 < r["monitor_share"] < 1 for r in rows[1:])
    tables = bench.main(["--tables", "loss,augment,throughput", "--ks", "8", "--batches", "16", "--aug-batch",
                         "8", "--steps", "1", "--warmup", "0", "--throughput-epochs", "1",
                         "--throughput-images", "16", "--throughput-batch", "8",
                         "--losses", "peira"])
    assert [(r["k"], r["B"]) for r in tables["loss"]] == [(8, 16)]
    assert tables["augment"][0]["batched"] > 0 and tables["throughput"][0]["per-image"] > 0
    # the loss table compares like with like: the explicit formula has PEIRALoss's value and moments
    u, v = random_pair(16, 5, seed=4)
    u, v = u.float(), v.float()
    peira_loss = peira.PEIRALoss(5, lam=0.7, eta=0.5)
    peira_loss(v, u)
    N, S = peira_loss.N.clone(), peira_loss.S.clone()
    torch.testing.assert_close(bench.explicit_peira_loss(u, v, N, S, 0.7, 0.5), peira_loss(u, v))
    torch.testing.assert_close(N, peira_loss.N)


def test_requirements_lower_bounds_cover_the_apis_used():
    """torchvision.io.decode_image(path) (train_imagenet.read_rgb) exists from torchvision 0.20,
    which needs torch 2.5: the lower bounds must not promise older versions."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "requirements.txt")) as fh:
        bounds = dict(re.findall(r"^([a-z]+)>=([0-9.]+)", fh.read(), re.M))
    version = lambda text: tuple(int(x) for x in text.split(".")[:2])  # noqa: E731
    assert version(bounds["torchvision"]) >= (0, 20) and version(bounds["torch"]) >= (2, 5), bounds


# -----------------------------------------------------------------------------
# simsiam_dynamics.py, reduced

def test_simsiam_dynamics_reduced(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "GRAD_REPEATS", 100)
    results = sd.main(["--starts", "4", "--out", str(tmp_path)])
    rows = [r for sec in (1, 2, 3, 4, 5) for r in results[f"section{sec}"]["rows"]]
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
# code shared by train_cifar.py and train_imagenet.py: losses and the training step under DDP,
# gradient accumulation, checkpoints and resume rules, on tiny batch-norm-free models

SHARED_BEGIN = "# shared by train_cifar.py and train_imagenet.py"
SHARED_END = "# end of the code shared by train_cifar.py and train_imagenet.py"


def test_shared_code_is_identical_in_both_image_scripts():
    here = os.path.dirname(os.path.abspath(__file__))
    blocks = []
    for name in ("train_cifar.py", "train_imagenet.py"):
        with open(os.path.join(here, name)) as fh:
            text = fh.read()
        blocks.append(text[text.index(SHARED_BEGIN):text.index(SHARED_END)])
    assert blocks[0] == blocks[1] and "def train_step" in blocks[0] and "def save_checkpoint" in blocks[0]


class TinySSL(nn.Module):
    """Batch-norm-free stand-in for the image models: forward(x1, x2) -> (h1, z1, z2, p1, p2)."""

    def __init__(self, predictor):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
        self.projector = nn.Sequential(nn.Tanh(), nn.Linear(8, 6))
        self.predictor = nn.Linear(6, 6) if predictor else None

    def forward(self, x1, x2):
        h1, h2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(h1), self.projector(h2)
        if self.predictor is None:
            return h1, z1, z2, None, None
        return h1, z1, z2, self.predictor(z1), self.predictor(z2)


def tiny_ssl_batches(steps=2, n=16):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 3, 2, 2, generator=g), torch.randn(n, 3, 2, 2, generator=g),
             torch.randint(0, 10, (n,), generator=g)) for _ in range(steps)]


def tiny_ssl_run(loss, batches, accum=1, world=1, rank=0, clip=0.5):
    """SGD steps of tc.train_step on TinySSL (DDP when world > 1, each rank taking its
    contiguous share of every batch); returns the weights, probe and running moments."""
    torch.manual_seed(0)
    model, probe = TinySSL(loss == "simsiam"), nn.Linear(8, 10)
    peira_loss = peira.PEIRALoss(6, lam=0.3, eta=0.6)
    opts = (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(probe.parameters(), lr=0.1))
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else None
    for step, batch in enumerate(batches):
        local = [t.chunk(world)[rank] for t in batch]
        tc.train_step(ddp or model, ddp, model, probe, peira_loss, opts, local, loss, 0.3, 0.6 - 0.1 * step,
                      accum, clip, world, nullcontext())
    peira_loss.all_reduce_moments()  # the monitor of the other losses keeps each rank's moments
    return {"model": [p.detach().clone() for p in model.parameters()],
            "probe": [p.detach().clone() for p in probe.parameters()], "N": peira_loss.N.clone()}


DDP_CASES = [("peira", 1), ("peira_direct", 1), ("simsiam", 1), ("vicreg", 1), ("vicreg", 2),
             ("peira_direct", 2)]


def _fake_cifar_download(root):
    """A slow download (the other rank must wait for it) that leaves a log file per call."""
    with open(os.path.join(root + "_log", f"download{dist.get_rank()}"), "w"):
        pass
    time.sleep(0.5)
    make_fake_cifar(root, n_train=20, n_test=10)


def _non_finite_on_one_rank(rank, world):
    """A NaN SimSiam loss on rank 1 only (a NaN predictor weight: the embeddings, which the PEIRA
    monitor checks on every rank, stay finite): every rank must get the non-finite loss and skip
    the update (with a local check rank 0 would go on into the probe's all-reduce while rank 1
    has stopped). Then NaN weights on rank 1 only: check_replicas raises FloatingPointError on
    both ranks."""
    torch.manual_seed(0)
    model, probe = TinySSL(True), nn.Linear(8, 10)
    ddp = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
    if rank == 1:
        with torch.no_grad():
            model.predictor.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in (*model.parameters(), *probe.parameters())]
    opts = (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(probe.parameters(), lr=0.1))
    batch = [t.chunk(world)[rank] for t in tiny_ssl_batches(1)[0]]
    loss, _ = tc.train_step(ddp, ddp, model, probe, peira.PEIRALoss(6, lam=0.3, eta=0.6), opts, batch,
                            "simsiam", 0.3, 0.6, 1, 0.0, world, nullcontext())
    after = [p.detach() for p in (*model.parameters(), *probe.parameters())]
    weights = [torch.ones(3), torch.tensor([float("nan") if rank == 1 else 0.0])]
    try:
        tc.check_replicas(weights, world, "weights")
        error = "none"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    unchanged = all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(before, after))
    return {"loss": loss, "unchanged": unchanged, "error": error}


def _two_rank_worker(rank, world, port, folder, imagenet_eval_argv, cifar_eval_argv):
    """The spawned tests in one pair of processes (spawning costs seconds): rank-0 download,
    training steps of every loss, a non-finite value on one rank, CIFAR and ImageNet --eval. A
    collective that one rank never joins fails after 60 s instead of hanging."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    tc.download_cifar = _fake_cifar_download
    out = {"train_x": tc.load_splits(os.path.join(folder, "data"), 0, rank, world)[0]}
    out.update({f"{loss}/{accum}": tiny_ssl_run(loss, tiny_ssl_batches(), accum, world, rank)
                for loss, accum in DDP_CASES})
    out["non_finite"] = _non_finite_on_one_rank(rank, world)
    idx = torch.arange(rank, 5, world)  # 5 items over 2 ranks: rank r holds r, r + 2, ...
    out["gather"] = ti.gather_on_rank0(idx[:, None] * torch.ones(1, 3), idx, rank, world)
    args = tc.parser.parse_args(cifar_eval_argv)
    tc.check_args(args)
    out["cifar_eval"] = tc.evaluate_checkpoint(args, rank, world, torch.device("cpu"))
    args = ti.parser.parse_args(imagenet_eval_argv)
    ti.check_args(args)
    out["imagenet_eval"] = ti.evaluate_checkpoint(args, ti.check_layout(args.data), rank, world,
                                                  torch.device("cpu"))  # ends the process group
    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory, tiny_imagefolder):
    """(per-rank results, download log, the ImageNet --eval command line, the CIFAR one)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    (folder / "data_log").mkdir()
    torch.manual_seed(0)
    state = {"model": ti.SSLModel("peira", [64, 64, 32]).state_dict(), "epoch": 0,
             "config": {"loss": "peira", "proj": "64-64-32"}}
    empty = {"probe": {}, "peira": {}, "opt": {}, "probe_opt": {}}
    ti.save_checkpoint(str(folder / "in1k.pt"), {**empty, **state})
    argv = imagenet_args(tiny_imagefolder, folder, "--eval", str(folder / "in1k.pt"), "--probe-epochs", "10",
                         "--probe-batch", "8")
    config = {"loss": "peira", "width": 4, "proj": "16-8", "subset": 0}
    state = {"model": tc.SSLModel("peira", 4, [16, 8]).state_dict(), "epoch": 0, "config": config}
    tc.save_checkpoint(str(folder / "cifar.pt"), {**empty, **state})
    cifar_argv = ["--data", str(folder / "data"), "--eval", str(folder / "cifar.pt"), "--probe-epochs", "20"]
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(folder), argv, cifar_argv), nprocs=2, join=True)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, sorted(p.name for p in (folder / "data_log").iterdir()), argv, cifar_argv


def test_two_ranks_train_as_one_process_on_the_concatenated_batch(two_rank_results):
    """Every loss's training step on 2 gloo ranks (DDP, 8 images each) gives the weights, online
    probe and running moments of one process on the 16 images; identical on both ranks. A missing
    all-reduce (weights or probe), or local-batch statistics in peira_direct / VICReg, fail this.
    VICReg and peira_direct with 2 micro-batches per rank are exact too."""
    ranks = two_rank_results[0]
    for loss, accum in DDP_CASES:
        key = f"{loss}/{accum}"
        single = tiny_ssl_run(loss, tiny_ssl_batches())
        for part in ("model", "probe"):
            for a, b, ref in zip(ranks[0][key][part], ranks[1][key][part], single[part]):
                assert torch.equal(a, b), (key, part)  # the ranks agree bit for bit
                torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6, msg=f"{key} {part}")
        torch.testing.assert_close(ranks[0][key]["N"], single["N"], rtol=1e-5, atol=1e-6)
    # the check discriminates: one rank's half alone gives other weights
    half = tiny_ssl_run("peira_direct", [[t[:8] for t in b] for b in tiny_ssl_batches()])
    both = ranks[0]["peira_direct/1"]["model"]
    assert max((a - b).abs().max().item() for a, b in zip(half["model"], both)) > 1e-3


def test_a_non_finite_value_on_one_rank_stops_every_rank(two_rank_results):
    """NaN on rank 1 only: both ranks get the non-finite loss at the same step and update nothing
    (the loss is all-reduced before the check), and NaN weights on rank 1 only give both ranks a
    FloatingPointError naming the rank, not "weights differ across ranks"."""
    for r in two_rank_results[0]:
        result = r["non_finite"]
        assert math.isnan(result["loss"]) and result["unchanged"], result
        assert result["error"].startswith("FloatingPointError: non-finite weights"), result
        assert "rank 1: 1 of 2" in result["error"] and "rank 0" not in result["error"], result


def test_gradient_accumulation_vicreg_exact_peira_as_documented():
    batch = tiny_ssl_batches(1)
    x1, x2, _ = batch[0]
    # VICReg: the gradient of the loss of all 16 images (the model has no batch norm) ...
    torch.manual_seed(0)
    model = TinySSL(False)
    w0 = [p.detach().clone() for p in model.parameters()]
    exact = torch.autograd.grad(tc.vicreg_loss(*model(x1, x2)[1:3], 1), list(model.parameters()))
    # ... which the mean of the two half-batch losses' gradients is not (the check discriminates)
    halves = sum(tc.vicreg_loss(*model(x1[j::2], x2[j::2])[1:3], 1) / 2 for j in range(2))
    naive = torch.autograd.grad(halves, list(model.parameters()))
    assert max((a - b).abs().max().item() for a, b in zip(exact, naive)) > 1e-3
    for accum in (1, 2):  # one SGD step (lr 0.1, no clipping) with 1 or 2 micro-batches
        w1 = tiny_ssl_run("vicreg", batch, accum=accum, clip=0.0)["model"]
        for a, b, g in zip(w0, w1, exact):
            torch.testing.assert_close((a - b) / 0.1, g, rtol=1e-4, atol=1e-6)
    # PEIRA: micro-batch j is a PEIRA step with η_micro = 1 − (1 − η)^(1/2); recomputed here
    eta, lam = 0.6, 0.3
    eta_m = 1 - (1 - eta) ** 0.5
    prev = tiny_ssl_batches(1, n=16)[0]
    x1p, x2p = prev[0] + 1.0, prev[1] - 0.5  # a first step initialises the running moments
    torch.manual_seed(0)
    model, probe = TinySSL(False), nn.Linear(8, 10)
    peira_loss = peira.PEIRALoss(6, lam=lam, eta=1.0)
    opts = (torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(probe.parameters(), lr=0.1))
    tc.train_step(model, None, model, probe, peira_loss, opts, (x1p, x2p, prev[2]), "peira", lam, 1.0, 1,
                  0.0, 1, nullcontext())
    N0, S0 = peira_loss.N.clone(), peira_loss.S.clone()
    w0 = [p.detach().clone() for p in model.parameters()]
    zs = [[t.detach() for t in model(x1[j::2], x2[j::2])[1:3]] for j in range(2)]
    tc.train_step(model, None, model, probe, peira_loss, opts, batch[0], "peira", lam, eta, 2, 0.0, 1,
                  nullcontext())
    N, S = N0, S0
    grad = [torch.zeros_like(p) for p in w0]
    ref = TinySSL(False)
    with torch.no_grad():
        for p, w in zip(ref.parameters(), w0):
            p.copy_(w)
    for j, (u, v) in enumerate(zs):
        Nj, Sj = peira.moments(u, v)
        N, S = (1 - eta_m) * N + eta_m * Nj, (1 - eta_m) * S + eta_m * Sj
        P, Q = peira.optimal_regressor(N, S, lam)
        _, u_, v_, _, _ = ref(x1[j::2], x2[j::2])
        aux = peira.aux_loss(u_, v_, P, Q, lam) / 2
        for acc, g in zip(grad, torch.autograd.grad(aux, list(ref.parameters()))):
            acc += g
    torch.testing.assert_close(peira_loss.N, N, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(peira_loss.S, S, rtol=1e-5, atol=1e-6)
    # the old moments keep the weight (1 − η) of a whole-batch step
    Na, Nb = (peira.moments(*z)[0] for z in zs)
    expected = (1 - eta) * N0 + eta_m * (1 - eta_m) * Na + eta_m * Nb
    torch.testing.assert_close(peira_loss.N, expected, rtol=1e-5, atol=1e-6)
    for p, w, g in zip(model.parameters(), w0, grad):
        torch.testing.assert_close(p.detach(), w - 0.1 * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lr", [0.04, 3.0])
def test_lars_conventions(lr):
    """One LARS step per convention against its formula in float64: VICReg's (the trust 0.001 scales
    lr) and solo-learn's (0.02, clipped: the step is min(0.02‖p‖/(‖g‖ + wd‖p‖), lr)·(g + wd·p));
    a bias gets plain SGD. At lr 0.04 solo-learn's step is the clipped one, at lr 3 the trust one."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 5, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    grad_w, grad_b = 0.01 * torch.randn(6, 5, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    wd = 0.1  # ‖g‖ ≪ ‖p‖ as in a network: solo-learn's trust ratio (0.18 here) exceeds lr 0.04
    d = grad_w + wd * weight
    expected = {"vicreg": lr * 0.001 * weight.norm() / d.norm(),
                "solo-learn": min(0.02 * weight.norm() / (grad_w.norm() + wd * weight.norm()), lr)}
    assert (expected["solo-learn"] == lr) == (lr == 0.04)
    for convention, rate in expected.items():
        w, b = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        w.grad, b.grad = grad_w.clone(), grad_b.clone()
        opt = tc.LARS([w, b], lr=lr, weight_decay=wd, convention=convention)
        opt.step()
        torch.testing.assert_close(w.detach(), weight - rate * d, rtol=1e-7, atol=1e-12)  # eps 1e-8
        torch.testing.assert_close(b.detach(), bias - lr * grad_b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="convention"):
        tc.LARS([w], lr=0.1, convention="lightly")


@pytest.mark.parametrize("convention", ["vicreg", "solo-learn"])
def test_lars_steps_with_momentum_and_zero_norms(convention):
    """Three LARS steps on two groups of weights, a zero weight, a zero gradient and a bias, against the
    update written parameter by parameter in float64 (the momentum buffer holds the scaled steps; a
    zero norm gives the plain step, g + wd·p for vicreg, g for solo-learn)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 3, 3, 3), (6, 5), (6, 5), (6, 5), (6,)]
    params = [nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in shapes]
    with torch.no_grad():
        params[1].zero_()  # ‖p‖ = 0
    reference = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in reference]
    lr, wd, momentum = 0.5, 1e-2, 0.9
    groups = [{"params": params[:3]}, {"params": params[3:], "fixed_lr": True}]  # two groups, one key more
    opt = tc.LARS(groups, lr=lr, weight_decay=wd, momentum=momentum, convention=convention)
    for _ in range(3):
        grads = [0.1 * torch.randn(s, generator=g, dtype=F64) for s in shapes]
        grads[2].zero_()  # ‖g‖ = 0
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for i, (w, grad) in enumerate(zip(reference, grads)):
            d = grad
            if w.ndim > 1:
                decayed = grad + wd * w
                if convention == "vicreg":
                    ok = w.norm() > 0 and decayed.norm() > 0
                    d = 0.001 * w.norm() / decayed.norm() * decayed if ok else decayed
                else:
                    ok = w.norm() > 0 and grad.norm() > 0
                    q = min(0.02 * w.norm() / (grad.norm() + wd * w.norm() + 1e-8) / lr, 1.0)
                    d = q * decayed if ok else grad
            buffers[i] = momentum * buffers[i] + d
            reference[i] = w - lr * buffers[i]
        for p, w in zip(params, reference):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_checkpoint_save_refuses_non_finite_weights_and_load_falls_back(tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    state = {"model": {"w": torch.ones(3)}, "probe": {}, "peira": {}, "opt": {}, "probe_opt": {}, "epoch": 1,
             "config": {"loss": "peira"}}
    tc.save_checkpoint(path, state)
    tc.save_checkpoint(path, {**state, "epoch": 2})
    assert tc.load_checkpoint(path)["epoch"] == 2 and tc.read_checkpoint(path + ".prev")["epoch"] == 1
    with pytest.raises(FloatingPointError, match="model.w"):
        tc.save_checkpoint(path, {**state, "model": {"w": torch.tensor([1.0, float("nan")])}, "epoch": 3})
    assert tc.read_checkpoint(path)["epoch"] == 2  # nothing was written
    with open(path, "r+b") as fh:  # truncated, as by a full disk or a killed copy
        fh.truncate(100)
    assert tc.load_checkpoint(path)["epoch"] == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
    # the damaged file is moved aside: the next save keeps the good one as ckpt.pt.prev
    tc.save_checkpoint(path, {**state, "epoch": 2})
    assert tc.read_checkpoint(path + ".prev")["epoch"] == 1 and tc.read_checkpoint(path)["epoch"] == 2
    assert os.path.exists(path + ".bad")
    assert tc.load_checkpoint(path, rank=1)["epoch"] == 2
    with open(path, "wb") as fh:  # rank 1 falls back too, but leaves the file to rank 0
        fh.write(b"garbage")
    assert tc.load_checkpoint(path, rank=1)["epoch"] == 1 and os.path.exists(path)
    with open(path + ".prev", "wb") as fh:
        fh.write(b"garbage")
    with pytest.raises(SystemExit, match="no readable checkpoint"):
        tc.load_checkpoint(path)
    assert os.path.exists(path)  # nothing is moved when no checkpoint is readable
    assert tc.load_checkpoint(str(tmp_path / "none.pt")) is None


def test_check_replicas_names_non_finite_weights():
    tc.check_replicas([torch.ones(3), torch.zeros(2)], 1, "weights")
    with pytest.raises(FloatingPointError, match=r"non-finite weights .*rank 0: 1 of 2"):
        tc.check_replicas([torch.ones(3), torch.tensor([0.0, float("nan")])], 1, "weights")


def test_resume_rules():
    saved = {"loss": "peira", "epochs": 10, "proj": "8-4", "world_size": 2, "workers": 4, "data": "a"}
    assert tc.check_resume(saved, {**saved, "workers": 1, "data": "b"}, []) == []  # not part of the run
    with pytest.raises(SystemExit, match=r"(?s)loss: checkpoint 'peira', now 'vicreg'.*world_size"):
        tc.check_resume(saved, {**saved, "loss": "vicreg", "world_size": 1}, [])
    changes = tc.check_resume(saved, {**saved, "epochs": 20}, ["epochs"])
    assert changes == ["epochs changed from 10 to 20 (--allow-change)"]
    # a setting added since the checkpoint was written reads as its value then (ADDED_SETTINGS)
    before = {"fix_pred_lr": False, "zero_init_residual": False, "pred_hidden": None}
    assert tc.check_resume(saved, {**saved, **before}, []) == []
    with pytest.raises(SystemExit, match="fix_pred_lr: checkpoint False, now True"):
        tc.check_resume(saved, {**saved, "fix_pred_lr": True}, [])
    with pytest.raises(SystemExit, match="zero_init_residual: checkpoint False, now True"):
        tc.check_resume(saved, {**saved, **before, "zero_init_residual": True}, [])
    assert ti.check_resume(saved, {**saved, "zero_init_residual": False}, []) == []
    with pytest.raises(SystemExit, match="zero_init_residual: checkpoint False, now True"):
        ti.check_resume(saved, {**saved, "zero_init_residual": True}, [])


# -----------------------------------------------------------------------------
# train_cifar.py on a small fake CIFAR-10 in torchvision's on-disk format

def make_fake_cifar(root, n_train=640, n_test=320, seed=0):
    """cifar-10-batches-py/{data_batch_1..5, test_batch}: pickled dicts of uint8 rows (N, 3072)
    and labels; images are noisy class-coloured squares so that accuracy means something."""
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


@pytest.fixture(autouse=True)
def no_cifar_download(monkeypatch):
    """The tests never touch the network: a download attempt fails as it would offline."""

    def offline(root):
        raise OSError("no network in the tests")
    monkeypatch.setattr(tc, "download_cifar", offline)


def cifar_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--tiny", "--subset", "128", "--batch-size", "64",
            "--workers", "0", *extra]


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("loss", ["peira", "peira_direct", "simsiam", "vicreg"])
def test_train_cifar_two_steps_of_each_loss(fake_cifar, tmp_path, loss):
    history = tc.main(cifar_args(fake_cifar, tmp_path, "--loss", loss, "--epochs", "1"))
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in steps] == [0, 1] and all(math.isfinite(r["loss"]) for r in steps)
    # class-tinted images: kNN on the features is far above chance (10%), and so is the online probe
    # (fit on the clean features kNN reads; trained on two augmented batches it stayed near chance)
    assert history[-1]["knn"] > 0.3 and math.isfinite(history[-1]["objective"])
    assert history[-1]["online_probe"] > 0.3
    for name in ("results.json", "objective_vs_knn.png", "alignment_by_epoch.png"):
        assert (tmp_path / name).exists(), name
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["loss"] == loss and ckpt["config"]["world_size"] == 1


def test_fix_pred_lr_keeps_the_predictor_at_the_peak_learning_rate(fake_cifar, tmp_path):
    """SimSiam with --fix-pred-lr: after a cosine-decayed epoch the predictor's groups hold the peak
    learning rate, the others the schedule's last value; refused for a loss without a predictor."""
    tc.main(cifar_args(fake_cifar, tmp_path, "--loss", "simsiam", "--fix-pred-lr", "--epochs", "1",
                       "--warmup-epochs", "0"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    groups, peak = ckpt["opt"]["param_groups"], ckpt["config"]["lr"]
    model = tc.SSLModel("simsiam", 4, [8, 8])
    args = tc.parse_args(["--loss", "simsiam", "--fix-pred-lr"])
    tc.check_args(args)
    fixed = [p for g in tc.make_optimizer(model, args).param_groups if g["fixed_lr"] for p in g["params"]]
    assert sorted(map(id, fixed)) == sorted(map(id, model.predictor.parameters()))
    assert sum(len(g["params"]) for g in groups if g["fixed_lr"]) == len(fixed)
    assert all(g["lr"] == peak for g in groups if g["fixed_lr"])
    assert all(0 < g["lr"] < 0.9 * peak for g in groups if not g["fixed_lr"])
    with pytest.raises(SystemExit):  # argparse's error: "--fix-pred-lr: --loss peira has no predictor"
        tc.main(cifar_args(fake_cifar, tmp_path / "peira", "--fix-pred-lr", "--epochs", "1"))
    with pytest.raises(SystemExit, match="another --fix-pred-lr"):  # its optimiser groups differ
        tc.main(cifar_args(fake_cifar, tmp_path, "--loss", "simsiam", "--no-fix-pred-lr", "--epochs", "2",
                           "--warmup-epochs", "0", "--resume", "--allow-change", "fix_pred_lr,epochs"))


def test_pred_hidden_sets_simsiam_predictor_width_through_resume_and_eval(fake_cifar, tmp_path, capsys):
    """--pred-hidden: a resume may name the width the checkpoint has (k/4 by default) but no other,
    even if allowed; the width is saved, and --eval and bench_images rebuild it from the checkpoint's
    configuration; refused for a loss without a predictor."""
    default = cifar_args(fake_cifar, tmp_path / "default", "--loss", "simsiam")
    tc.main(default + ["--epochs", "1"])
    allow = ["--resume", "--allow-change", "pred_hidden,epochs"]
    history = tc.main(default + ["--pred-hidden", "16", "--epochs", "2"] + allow)  # k 64 (--tiny): k/4 = 16
    assert [r["epoch"] for r in history] == [1, 2]
    with pytest.raises(SystemExit, match="another --pred-hidden"):
        tc.main(default + ["--pred-hidden", "24", "--epochs", "3"] + allow)
    wide = tmp_path / "wide"
    tc.main(cifar_args(fake_cifar, wide, "--loss", "simsiam", "--pred-hidden", "24", "--epochs", "1"))
    assert torch.load(wide / "ckpt.pt", weights_only=True)["model"]["predictor.0.weight"].shape == (24, 64)
    evaluation = tc.main(["--data", fake_cifar, "--eval", str(wide / "ckpt.pt"), "--probe-epochs", "1"])
    assert evaluation["epoch"] == 1
    evaluation = bench_images.evaluate_run(str(wide), tc.load_splits(fake_cifar, 128), 1)
    assert evaluation["config"]["pred_hidden"] == 24
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tc.main(cifar_args(fake_cifar, tmp_path / "vicreg", "--loss", "vicreg", "--pred-hidden", "8"))
    assert "--pred-hidden: --loss vicreg has no predictor" in capsys.readouterr().err


def test_vicreg_loss_against_its_definition_and_the_coefficients_flag(fake_cifar, tmp_path, monkeypatch,
                                                                      capsys):
    """vicreg_loss against VICReg's three terms written out in float64 (mean squared distance; hinge
    on each dimension's std, 1 − sqrt(var + 1e-4), averaged over dimensions and over the two views;
    squared off-diagonal covariances / d, summed over the views), at the paper's 25 / 25 / 1 and at
    --vicreg-coeffs' values; train_cifar.py hands the flag's coefficients to the loss, and refuses bad
    values and the flag with another loss."""
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.2, 2.0, 12, dtype=torch.float64)  # some dimensions under the hinge's std 1
    z1 = torch.randn(64, 12, generator=g, dtype=torch.float64) * scale
    z2 = z1 + 0.3 * torch.randn(64, 12, generator=g, dtype=torch.float64)
    inv = ((z1 - z2) ** 2).sum(1).mean() / 12
    var = sum(torch.clamp(1 - torch.sqrt(torch.var(z, 0) + 1e-4), min=0).mean() for z in (z1, z2)) / 2
    cov = 0
    for z in (z1, z2):
        c = np.cov(z.numpy(), rowvar=False)
        cov = cov + (np.sum(c ** 2) - np.sum(np.diag(c) ** 2)) / 12
    for coeffs in ((25.0, 25.0, 1.0), (2.0, 0.5, 7.0)):
        expected = coeffs[0] * inv + coeffs[1] * var + coeffs[2] * cov
        got = tc.vicreg_loss(z1, z2, 1, *([coeffs] if coeffs != tc.VICREG_COEFFS else []))  # default
        assert math.isclose(float(got), float(expected), rel_tol=1e-5)
    seen = []
    monkeypatch.setattr(tc, "vicreg_loss", lambda z1, z2, world, coeffs: seen.append(coeffs) or z1.mean())
    out = tmp_path / "vicreg"
    tc.main(cifar_args(fake_cifar, out, "--loss", "vicreg", "--epochs", "1", "--vicreg-coeffs", "10,25,0.5"))
    assert seen and set(seen) == {(10.0, 25.0, 0.5)}
    assert json.load(open(out / "config.json"))["vicreg_coeffs"] == "10,25,0.5"
    for bad, message in ((["--vicreg-coeffs", "25,25"], "three numbers"),
                         (["--vicreg-coeffs", "0,0,0"], "three numbers"),
                         (["--vicreg-coeffs", "25,-1,1"], "three numbers ≥ 0"),
                         (["--loss", "peira", "--vicreg-coeffs", "1,1,1"], "--loss peira is not VICReg")):
        with pytest.raises(SystemExit):
            tc.main(cifar_args(fake_cifar, tmp_path / "bad", "--loss", "vicreg", "--epochs", "1", *bad))
        assert message in capsys.readouterr().err


def test_simsiam_loss_keeps_float32_precision_under_bf16_autocast():
    """The cosines in float32: under CPU autocast, with bf16 embeddings (as the projector gives
    them) and predictions close to the other view's (cosines near 1, as in training), the loss and
    its gradient match float64 on the same values; bf16 cosines were 1.3e-3 off, the gradient 14%."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(256, 64, generator=g).bfloat16() for _ in range(2))
    p1, p2 = ((z + 0.05 * torch.randn(256, 64, generator=g)).bfloat16().requires_grad_() for z in (z2, z1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tc.simsiam_loss(z1, z2, p1, p2)
    loss.backward()
    q1, q2 = (p.detach().double().requires_grad_() for p in (p1, p2))
    exact = -0.5 * (F.cosine_similarity(q1, z2.double()).mean() + F.cosine_similarity(q2, z1.double()).mean())
    exact.backward()
    assert abs(loss.item() - exact.item()) < 1e-6
    assert (p1.grad.double() - q1.grad).abs().max() < 0.01 * q1.grad.abs().max()  # bf16 rounding of the grad


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    """--zero-init-residual (the default of both scripts and models): each ResNet-18 block maps h to
    relu(shortcut(h)) at initialisation, and the ResNet-50's last batch norm of each block is 0;
    without it the residual branch contributes."""
    assert tc.parser.get_default("zero_init_residual") is True is ti.parser.get_default("zero_init_residual")
    assert (tc.SSLModel("peira", 4, [8, 8]).backbone.blocks[0].bn2.weight == 0).all()
    assert all((m.bn3.weight == 0).all() for m in ti.SSLModel("peira", [8, 8]).modules() if hasattr(m, "bn3"))
    for zero in (True, False):
        net, h = tc.ResNet18(4, zero), torch.randn(2, 3, 16, 16)
        h = net.stem(h)
        for block in net.blocks:
            assert torch.allclose(block(h), F.relu(block.shortcut(h))) is zero
            h = block(h)
        bn3 = [m.bn3.weight for m in ti.resnet50(zero).modules() if hasattr(m, "bn3")]
        assert len(bn3) == 16 and all(bool((w == 0).all()) is zero for w in bn3)


def test_train_cifar_warns_when_lam_switches_directions_off(fake_cifar, tmp_path, capsys):
    """λ² above every canonical correlation (≤ 1): PEIRA keeps none of the directions the training
    images show above their null (the class tints give some), and says so, before its first step (the
    untrained network's views: the record of epoch 0, which bench_images.initial_views reproduces) and
    after the epoch."""
    history = tc.main(cifar_args(fake_cifar, tmp_path, "--lam", "1.5", "--epochs", "1", "--subset", "640"))
    initial = read_jsonl(tmp_path / "metrics.jsonl")[0]
    last = history[-1]
    for stats in (initial, last):
        assert stats["kept_dims"] == 0 and stats["signal_dims"] >= 1 and 0 < stats["null_level"] < 1
        assert 0 < stats["lam_max"] <= 1
    out = capsys.readouterr().out
    assert out.count(f"warning: λ 1.5 keeps 0 of the {initial['signal_dims']} directions the untrained") == 1
    assert f"warning: λ 1.5 keeps 0 of the {last['signal_dims']} directions the training images" in out
    with open(tmp_path / "config.json") as fh:
        config = json.load(fh)
    setting = {k: config[k] for k in ("width", "proj", "bf16")}
    reproduced = bench_images.initial_views(tc.load_splits(fake_cifar, 640), setting)
    seen = reproduced.pop("corr_seen")
    assert set(reproduced.pop("kept_by_lam")) == {str(lam) for lam in bench_images.LAM_SWEEP}
    assert len(seen) == initial["signal_dims"] and seen[0] == initial["corr_top"]
    assert reproduced == {k: v for k, v in initial.items() if k not in ("epoch", "kept_dims")}
    # a λ below the untrained network's lam_max keeps at least half of what it sees, and does not warn
    tc.main(cifar_args(fake_cifar, tmp_path / "small", "--lam", f"{0.99 * initial['lam_max']:.4f}",
                       "--epochs", "1", "--subset", "640"))
    small = read_jsonl(tmp_path / "small" / "metrics.jsonl")[0]
    assert small["kept_dims"] >= tc.KEPT_WARN * small["signal_dims"] and small["signal_dims"] >= 1
    assert "untrained" not in capsys.readouterr().out


def test_view_corr_every_thins_the_diagnostic_and_leaves_the_run_alone(fake_cifar, tmp_path, monkeypatch):
    """--view-corr-every 5 over 3 epochs: the view correlations before training and after epochs 1 and
    3 only. Neither they nor the pass before training change the run (each draws from its own
    generators): its weights and every other number are those of a run with the diagnostic every epoch
    and no pass before training, so that a resume or bench_images may change the flag."""
    sparse = tc.main(cifar_args(fake_cifar, tmp_path / "5", "--epochs", "3", "--view-corr-every", "5"))
    initial = read_jsonl(tmp_path / "5" / "metrics.jsonl")[0]
    assert initial["epoch"] == 0 and initial["signal_dims"] >= 1
    assert [("signal_dims" in r) for r in sparse] == [True, False, True]
    view_correlations = tc.view_correlations
    skipped = {"null_level": math.nan, "signal_dims": 0, "kept_dims": 0, "corr_top": 0.0, "lam_max": math.nan}
    def without_the_pass_before_training(*a, **kw):
        return skipped if a[4] == tc.BEFORE_TRAINING else view_correlations(*a, **kw)
    monkeypatch.setattr(tc, "view_correlations", without_the_pass_before_training)
    dense = tc.main(cifar_args(fake_cifar, tmp_path / "1", "--epochs", "3", "--view-corr-every", "1"))
    assert all("signal_dims" in r for r in dense)
    timing = ("epoch_time", "img_per_s")
    for d, s in zip(dense, sparse):
        assert {k: v for k, v in s.items() if k not in timing} == \
            {k: v for k, v in d.items() if k in s and k not in timing}
    weights = [torch.load(tmp_path / e / "ckpt.pt", weights_only=True)["model"] for e in ("1", "5")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert "view_corr_every" in tc.NOT_RUN_KEYS


def test_image_benchmark_reuses_a_run_whatever_its_not_run_keys(fake_cifar, tmp_path, capsys):
    """bench_images.train_run reads a finished run back when only settings that never change a run
    differ (here --view-corr-every and --workers), and trains again a run resumed with --allow-change
    (its schedule is not the one its config.json now says)."""
    argv = cifar_args(fake_cifar, tmp_path, "--epochs", "1")
    first = bench_images.train_run(argv)
    assert "== train_cifar.py" in capsys.readouterr().out
    again = bench_images.train_run([*argv, "--workers", "1", "--view-corr-every", "5"])
    assert again == first and "== train_cifar.py" not in capsys.readouterr().out
    with open(tmp_path / "config.json") as fh:  # as if resumed with another schedule: trained again
        config = json.load(fh)
    with open(tmp_path / "config.json", "w") as fh:
        json.dump({**config, "allow_change": "epochs"}, fh)
    bench_images.train_run(argv)
    assert "== train_cifar.py" in capsys.readouterr().out


def test_online_probe_learns_a_separable_problem_within_one_tiny_epoch():
    """One epoch's fit of the online probe (PROBE_PASSES passes over the --tiny subset's 1024
    images) reads 10 linearly separable classes to > 90% on held-out points, features with the
    offset and scale of pooled ReLU features."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 128, generator=gen)

    def sample(n):
        y = torch.randint(0, 10, (n,), generator=gen)
        return (20 * (centers[y] + torch.randn(n, 128, generator=gen)) + 60).relu(), y

    (train_f, train_y), (test_f, test_y) = sample(1024), sample(2000)
    torch.manual_seed(0)
    probe = tc.OnlineProbe(128, 10)
    opt = torch.optim.SGD(probe.parameters(), lr=tc.PROBE_LR, momentum=0.9)
    tc.fit_online_probe(probe, opt, train_f, train_y, tc.PROBE_PASSES, seed=0)
    with torch.no_grad():
        assert (probe(test_f).argmax(1) == test_y).float().mean().item() > 0.9


def test_tiny_preset_gives_way_to_flags_and_keeps_each_recipe_optimiser():
    assert tc.parse_args(["--tiny"]).subset == 1024 and tc.parse_args(["--tiny", "--subset", "0"]).subset == 0
    args = tc.parse_args(["--tiny", "--loss", "simsiam"])
    tc.check_args(args)
    assert (args.optimizer, args.lr, args.batch_size) == ("sgd", 0.03 * 128 / 256, 128)  # SimSiam's lr / 256
    args = tc.parse_args(["--tiny", "--loss", "vicreg"])
    tc.check_args(args)
    assert (args.optimizer, args.lr) == ("lars", tc.TINY_LARS_LR)


def test_image_benchmark_splits(tmp_path):
    """bench_images.py writes its splits in CIFAR-10's on-disk format, which train_cifar.py reads back
    image for image: digits (the 8×8 scans, upsampled), and CIFAR-10 from an image folder; the
    training subset is class-balanced, the validation images are training images never trained on,
    and the test split holds the test images."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    setting = dict(bench_images.SETTING["digits"])
    args = bench_images.parser.parse_args(["--dataset", "digits", "--out", str(tmp_path / "digits")])
    test_dir, val_dir = (bench_images.build_split(args, setting, s) for s in ("test", "validation"))
    train_x, train_y, test_x, test_y = tc.load_splits(test_dir, 0)
    val_train, _, val_x, _ = tc.load_splits(val_dir, 0)
    images, labels = bench_images.digits_as_cifar()
    index = {img.numpy().tobytes(): i for i, img in enumerate(images)}
    assert len(index) == 1797 and torch.equal(labels, torch.from_numpy(load_digits().target))
    train, test, val = ([index[img.numpy().tobytes()] for img in x] for x in (train_x, test_x, val_x))
    assert len(test) == 300 and torch.equal(test_y.bincount(), torch.full((10,), 30))
    assert torch.equal(labels[train], train_y) and torch.equal(val_train, train_x)  # same training images
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert len(val) == 300 and len(train) > 1150
    scans = torch.from_numpy(load_digits().images).float().flatten(1) * 255 / 16  # each image its scan
    assert (torch.cdist(F.avg_pool2d(images[:, :1].float(), 4).flatten(1), scans).argmin(1)
            == torch.arange(1797)).float().mean() > 0.99
    # CIFAR-10 from an image folder, at a small setting
    cifar, cifar_labels = smooth_images(40, seed=7)[0], (torch.arange(40) % 10).tolist()
    write_image_folder(str(tmp_path / "folder"), cifar, cifar_labels, "png")
    args = bench_images.parser.parse_args(["--data", str(tmp_path / "folder"), "--out", str(tmp_path / "c")])
    small = {**bench_images.SETTING["cifar10"], "train_size": 10, "val_size": 10}
    train_x, train_y, test_x, _ = tc.load_splits(bench_images.build_split(args, small, "test"), 0)
    _, _, val_x, _ = tc.load_splits(bench_images.build_split(args, small, "validation"), 0)
    assert len(train_x) == 10 and torch.equal(train_y.sort().values, torch.arange(10)) and len(test_x) == 10
    seen = {x.numpy().tobytes() for x in train_x}
    assert not seen & {x.numpy().tobytes() for x in val_x}
    assert {x.numpy().tobytes() for x in test_x} == {cifar[i].numpy().tobytes() for i in range(30, 40)}


def test_image_benchmark_statistics_and_trials(capsys):
    """bench_images: the summary of a run from its records, the paired difference and its t interval
    against a direct computation, one table row per label; every loss gets the same number of trials,
    and SimSiam's learning rate follows the batch."""
    gen = torch.Generator().manual_seed(0)
    history = [{"epoch": e + 1, "knn": torch.rand(1, generator=gen).item(), "rank_N": 3.0 + e,
                "alignment": 0.5 + e / 10, "objective": torch.randn(1, generator=gen).item(),
                "epoch_time": 2.0} for e in range(6)]
    history[-1].update(signal_dims=5, null_level=0.2)  # the view correlations: the last record has them
    evaluation = {"linear_probe": 0.6, "knn_k20": 0.5, "knn_k200": 0.4}
    row = bench_images.summary(history, evaluation)
    knn, objective = [h["knn"] for h in history], [h["objective"] for h in history]
    assert (row["knn_first"], row["knn_last"], row["rank_N"]) == (knn[0], knn[-1], 8.0)
    assert row["alignment_first"] == 0.5
    mk, mo = sum(knn) / 6, sum(objective) / 6
    cov = sum((k - mk) * (o - mo) for k, o in zip(knn, objective))
    corr = cov / math.sqrt(sum((k - mk) ** 2 for k in knn) * sum((o - mo) ** 2 for o in objective))
    assert abs(row["objective_knn_corr"] - corr) < 1e-12 and row["train_time_s"] == 12.0
    a = [{"linear_probe": x} for x in (0.60, 0.70, 0.65)]
    b = [{"linear_probe": x} for x in (0.50, 0.66, 0.58)]
    d = [0.10, 0.04, 0.07]
    sd = math.sqrt(sum((x - 0.07) ** 2 for x in d) / 2)
    mean, lo, hi = bench_images.paired_difference(a, b, "linear_probe")
    assert abs(mean - 0.07) < 1e-12 and abs(hi - mean - 4.302652729911275 * sd / math.sqrt(3)) < 1e-9
    assert abs((lo + hi) / 2 - mean) < 1e-12
    bench_images.print_table({"peira-lam0.1": [row, row]}, {"raw pixels": evaluation})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| peira")]
    assert lines and "| peira-lam0.1 | 2 | 60.0 ± 0.0 | 50.0 ± 0.0 | 40.0 ± 0.0 |" in lines[0]
    assert len({len(trials) for trials in bench_images.TRIALS.values()}) == 1
    setting = bench_images.SETTING["cifar10"]
    argv = bench_images.run_argv("d", "o", "simsiam", {"lr_per_256": 0.03}, 1, setting)
    assert float(argv[argv.index("--lr") + 1]) == 0.03 * setting["batch"] / 256
    trial = {"lam": 0.3, "lars": "solo-learn"}
    args = tc.parse_args(bench_images.run_argv("d", "o", "peira", trial, 2, setting))
    assert (args.lam, args.lars, args.seed, args.width, args.proj) == (0.3, "solo-learn", 2, setting["width"],
                                                                       setting["proj"])
    assert args.bf16 == setting["bf16"]
    for flag in (True, False):  # a boolean setting becomes --flag or --no-flag
        trial = {"lr_per_256": 0.24, "fix_pred_lr": flag}
        argv = bench_images.run_argv("d", "o", "simsiam", trial, 0, setting)
        assert tc.parse_args(argv).fix_pred_lr is flag
    argv = bench_images.run_argv("d", "o", "simsiam", {"lr_per_256": 0.24, "batch_size": 64}, 0, setting)
    assert float(argv[argv.index("--lr") + 1]) == 0.24 * 64 / 256  # the trial's batch, not SETTING's


def test_image_benchmark_tune_settles_near_ties_with_a_second_seed(tmp_path, monkeypatch, capsys):
    """--tune: trials within TIE_MARGIN of their loss's best seed-0 probe run again with TIE_SEED, and
    the mean over both seeds chooses (here a trial that neither seed alone would pick); a loss without a
    near tie keeps its seed-0 best and runs nothing twice. Each loss has its own level, so that a best
    taken across losses would choose wrongly. Runs and evaluations are stand-ins with set probes."""
    trials, margin, tie_seed = bench_images.TRIALS, bench_images.TIE_MARGIN, bench_images.TIE_SEED
    probe = {}  # (label, seed) → the stand-in's probe
    for loss, tied, level in (("peira", False, 0.5), ("simsiam", True, 0.4), ("vicreg", True, 0.5)):
        names = [bench_images.trial_name(loss, t) for t in trials[loss]]
        for name in names:
            probe[name, 0], probe[name, 1] = level - 0.2, level - 0.2
        # seed 0 alone picks the first, seed 1 alone the second, their mean the third
        probe[names[0], 0], probe[names[0], 1] = level, level - 0.1
        probe[names[1], 0], probe[names[1], 1] = level - (0.75 if tied else 2) * margin, level
        probe[names[2], 0], probe[names[2], 1] = level - (0.25 if tied else 2) * margin, level - 0.005
    trained = []

    def fake_train(argv):
        out = argv[argv.index("--out") + 1]
        trained.append(os.path.basename(out))
        return [{"epoch": e, "knn": 0.2, "rank_N": 4.0, "alignment": 0.1, "objective": -e, "epoch_time": 1.0,
                 "signal_dims": 3, "null_level": 0.2} for e in (1, 2)]

    def fake_evaluation(out, splits, probe_epochs):
        name, seed = os.path.basename(out).rsplit("-seed", 1)
        return {"linear_probe": probe[name, int(seed)], "knn_k20": 0.2, "knn_k200": 0.2}

    monkeypatch.setattr(bench_images, "train_run", fake_train)
    monkeypatch.setattr(bench_images, "evaluate_run", fake_evaluation)
    monkeypatch.setattr(bench_images, "references", lambda *a, **k: {})
    result = bench_images.main(["--dataset", "digits", "--tune", "--out", str(tmp_path)])
    with open(tmp_path / "tuned.json") as fh:
        choice = json.load(fh)["choice"]
    assert choice == {"peira": trials["peira"][0], "simsiam": trials["simsiam"][2],
                      "vicreg": trials["vicreg"][2]}
    twice = sorted(name for name in trained if name.endswith(f"-seed{tie_seed}"))
    assert twice == sorted(f"{bench_images.trial_name(loss, t)}-seed{tie_seed}"
                           for loss in ("simsiam", "vicreg") for t in trials[loss][:3])
    assert len(trained) == sum(len(t) for t in trials.values()) + 6
    assert result["near_ties"]["trials"] == {loss: trials[loss][:3] for loss in ("simsiam", "vicreg")}
    assert f"mean of seeds 0 and {tie_seed}, a near tie" in capsys.readouterr().out


def test_image_benchmark_trial_flag(capsys):
    """--trial: a loss and train_cifar.py flags, which override SETTING's; the benchmark's own settings,
    a missing loss and bad JSON are refused with what is wrong, as are --tune or --losses beside it."""
    assert bench_images.parse_trial('{"loss": "vicreg", "lr": 3.0, "proj": "128-128-64"}') == (
        "vicreg", {"lr": 3.0, "proj": "128-128-64"})
    setting = bench_images.SETTING["cifar10"]
    argv = bench_images.run_argv("d", "o", "vicreg", {"proj": "128-128-64"}, 0, setting)
    assert setting["proj"] != "128-128-64" and tc.parse_args(argv).proj == "128-128-64"
    for bad, message in (('{"lr": 3.0}', "needs a \"loss\""), ('{"loss": ["vicreg"]}', "needs a \"loss\""),
                         ('[1]', "needs a \"loss\""), ('{"loss": "vicreg"', "takes a JSON object"),
                         ('{"loss": "vicreg", "seed": 1, "resume": true}', "resume, seed are set by the")):
        with pytest.raises(ValueError, match=message):
            bench_images.parse_trial(bad)
    for argv, message in (([], "set by the benchmark"), (["--tune"], "not allowed with argument"),
                          (["--losses", "peira"], "--trial names its loss")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            bench_images.main(["--trial", '{"loss": "peira", "out": "x"}', "--out", "unused", *argv])
        assert message in capsys.readouterr().err
    # the λ sweep is its own mode: its runs are drawn, never chosen
    sweep = bench_images.lam_sweep_runs()
    assert [t["lam"] for t in sweep] == list(bench_images.LAM_SWEEP)
    for argv, message in ((["--tune"], "not allowed with argument"), (["--seeds", "1"], "seed 0"),
                          (["--losses", "vicreg"], "seed 0")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            bench_images.main(["--lam-sweep", "--out", "unused", *argv])
        assert message in capsys.readouterr().err


def test_simsiam_runs_its_own_cifar_recipe():
    args = tc.parser.parse_args(["--loss", "simsiam"])
    tc.check_args(args)
    assert (args.optimizer, args.batch_size, args.lr, args.wd, args.warmup_epochs, args.clip, args.proj,
            args.fix_pred_lr) == ("sgd", 512, 0.03 * 512 / 256, 5e-4, 0, 0.0, "2048-2048", True)
    model = tc.SSLModel("simsiam", 8, [2048, 2048])
    shapes = [tuple(m.weight.shape) for m in model.predictor if isinstance(m, nn.Linear)]
    assert shapes == [(512, 2048), (2048, 512)]  # predictor 2048-512-2048
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and len(model.projector) == 5  # 2 layers, BN out
    args = tc.parser.parse_args(["--loss", "simsiam", "--batch-size", "256", "--optimizer", "lars"])
    tc.check_args(args)  # flags override the recipe; lr follows the batch
    assert (args.optimizer, args.lr) == ("lars", 0.03)
    args = tc.parser.parse_args([])
    tc.check_args(args)  # PEIRA keeps the preprint's recipe
    assert (args.optimizer, args.batch_size, args.lr, args.proj) == ("lars", 256, 0.04, "2048-2048-1024")


def test_each_view_has_its_own_batch_norm_statistics():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    for forward in (tc.SSLModel("simsiam", 4, [16, 16]), ti.SSLModel("peira", [16, 8])):
        a, b = forward(x1, x2), forward(x1, 3 * x2 + 1)  # train mode: batch statistics
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # view 1 ignores view 2
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        assert not torch.allclose(a[2], b[2])


def test_train_cifar_resume_exact_after_a_corrupt_checkpoint(fake_cifar, tmp_path):
    """Resume is exact, falls back to the previous checkpoint when the last one is damaged,
    results.json covers the whole run (metrics.jsonl), not the last invocation, and the
    configuration is checked."""
    tc.main(cifar_args(fake_cifar, tmp_path / "straight", "--epochs", "3"))
    resumed = cifar_args(fake_cifar, tmp_path / "resumed", "--epochs", "3")
    tc.main(resumed + ["--stop-after", "2"])
    ckpt = tmp_path / "resumed" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated: epoch 2 is lost, epoch 1 is ckpt.pt.prev
    tc.main(resumed + ["--resume"])
    straight = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "step" in r]
    records = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == list(range(6))
    for a, b in zip(straight, steps):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"] and a["eta"] == b["eta"], (a, b)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    torch.testing.assert_close(a["peira"]["N"], b["peira"]["N"], rtol=0, atol=0)
    for key in a["probe"]:  # the online probe, fit per epoch from its previous weights
        torch.testing.assert_close(a["probe"][key], b["probe"][key], rtol=0, atol=0)
    epochs = [r for r in records if "knn" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    straight_epochs = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "knn" in r]
    assert [r["online_probe"] for r in epochs] == [r["online_probe"] for r in straight_epochs]
    results = json.loads((tmp_path / "resumed" / "results.json").read_text())
    corr = np.corrcoef([r["objective"] for r in epochs], [r["knn"] for r in epochs])[0, 1]
    assert results["epochs_logged"] == 3 and abs(results["objective_knn_corr"] - corr) < 1e-12
    # a resume must repeat the checkpoint's settings, or name the deliberate changes
    with pytest.raises(SystemExit, match=r"(?s)loss: checkpoint 'peira', now 'vicreg'.*epochs"):
        tc.main(resumed[:-2] + ["--epochs", "4", "--loss", "vicreg", "--resume"])
    history = tc.main(resumed[:-2] + ["--epochs", "4", "--resume", "--allow-change", "epochs"])
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]


def test_train_cifar_eval_mode(fake_cifar, tmp_path):
    tc.main(cifar_args(fake_cifar, tmp_path, "--epochs", "1"))
    res = tc.main(["--data", fake_cifar, "--eval", str(tmp_path / "ckpt.pt"),
                            "--probe-epochs", "300"])
    assert res["linear_top1"] > 0.3 and res["epoch"] == 1  # chance: 10%


def test_train_cifar_eval_on_two_ranks_probes_on_rank_0(two_rank_results):
    """--eval under torchrun: the ranks share the features (rank 0 alone downloads, see
    test_only_rank_0_downloads_cifar), rank 0 alone trains the probe, with one process's result."""
    ranks, _, _, argv = two_rank_results
    assert ranks[1]["cifar_eval"] is None
    assert ranks[0]["cifar_eval"] == tc.main(argv)


def test_cifar_views_do_not_depend_on_the_number_of_loader_workers():
    """Each image's views are seeded by (seed, epoch, index), not by the loader workers' seeds:
    0 and 2 workers give the same batches (so --workers may change on --resume); another epoch
    gives other views."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g)
    dataset = tc.TwoViews(images, torch.arange(24) % 10, seed=3)

    def views(epoch, workers):
        return [t for batch in tc.epoch_loader(dataset, epoch, 8, 0, 1, workers, False) for t in batch]
    a, b = views(1, 0), views(1, 2)
    assert len(a) == len(b) == 9 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], views(2, 0)[0])


# -----------------------------------------------------------------------------
# train_cifar.py's batched augmentation against torchvision's per-image transforms

def smooth_images(n, seed, size=32):
    """uint8 images with an image's smoothness (8×8 noise upsampled), and a float copy in [0, 1]."""
    x = F.interpolate(torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)), size=size,
                      mode="bilinear", align_corners=False)
    x = (x * 255).round().to(torch.uint8)
    return x, x.float() / 255


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue", "grayscale", "solarize"])
def test_batched_colour_operations_match_torchvision(name):
    """Each colour operation of the batched pipeline, with per-image factors, against
    torchvision.transforms.v2.functional image by image, to 1e-5; grey and saturated pixels included."""
    TF = torchvision.transforms.v2.functional
    _, x = smooth_images(24, seed=1)
    x[:6] = x[:6, :1]  # grey images: hue undefined
    x[6:12] = (x[6:12] * 3).round() / 3  # ties between channels, 0 and 1
    g = torch.Generator().manual_seed(2)
    f = torch.rand(24, generator=g) * 1.6 + 0.2
    on = torch.ones(24, dtype=torch.bool)
    if name in ("brightness", "contrast", "saturation"):
        op = ("brightness", "contrast", "saturation").index(name)
        order = torch.tensor([op, 0, 0, 0]).expand(24, 4).clone()
        order[:, 1:] = torch.tensor([i for i in range(4) if i != op])
        factors = torch.ones(24, 4)
        factors[:, op], factors[:, 3] = f, 0.0
        ours = tc.color_jitter(x, on, order, factors)
        ref = [getattr(TF, f"adjust_{name}")(im, float(fi)) for im, fi in zip(x, f)]
    elif name == "hue":
        shift = (f - 0.2) / 1.6 - 0.5  # [-0.5, 0.5]
        ours = tc.adjust_hue(x, shift)
        ref = [TF.adjust_hue(im, float(s)) for im, s in zip(x, shift)]
    elif name == "grayscale":
        ours = tc._gray(x).expand_as(x)
        ref = [TF.rgb_to_grayscale(im, num_output_channels=3) for im in x]
    else:
        params = {"solarize": on, "grayscale": ~on}
        ours = torch.where(params["solarize"].view(-1, 1, 1, 1) & (x >= 128 / 255), 1 - x, x)
        ref = [TF.solarize(im, 128 / 255) for im in x]
    assert (ours - torch.stack(ref)).abs().max() <= 1e-5


def ks_statistic(a, b):
    """Two-sample Kolmogorov–Smirnov statistic sup |F_a − F_b| (right-continuous ECDFs: ties handled)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    both = np.concatenate([a, b])
    ecdf_a, ecdf_b = np.searchsorted(a, both, "right") / len(a), np.searchsorted(b, both, "right") / len(b)
    return float(np.abs(ecdf_a - ecdf_b).max())


def test_batched_crop_boxes_follow_random_resized_crop():
    """Area scale and log aspect ratio of 10,000 batched boxes against 10,000 of v2.RandomResizedCrop
    (its own sampling): the KS statistic stays below the 1e-3-level critical value (0.0276), and the
    test has the power to reject torchvision's default scale (0.08, 1)."""
    n = 10_000
    critical = math.sqrt(-0.5 * math.log(1e-3 / 2)) * math.sqrt(2 / n)
    crop = torchvision.transforms.v2.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True)
    blank = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        boxes = [crop.make_params([blank]) for _ in range(n)]
    theirs = np.array([[b["height"], b["width"]] for b in boxes], float)

    def features(h, w):
        return {"scale": h * w / 1024, "log_ratio": np.log(w / h)}
    theirs = features(theirs[:, 0], theirs[:, 1])
    for scale, accept in (((0.2, 1.0), True), ((0.08, 1.0), False)):
        top, left, h, w = tc.sample_crop_boxes(n, torch.Generator().manual_seed(10), scale=scale)
        assert ((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all()
        ours = features(h.numpy().astype(float), w.numpy().astype(float))
        stat = ks_statistic(ours["scale"], theirs["scale"])
        assert (stat < critical) == accept, (scale, stat, critical)
        if accept:
            assert ks_statistic(ours["log_ratio"], theirs["log_ratio"]) < critical


def test_batched_views_match_torchvision_on_the_same_parameters():
    """The whole batched pipeline against torchvision's functional operations image by image with the
    same parameters (crop box, flip, jitter order and factors, grayscale, solarize), on floats: equal to
    1e-5 on the [0, 1] scale, crop borders included."""
    TF = torchvision.transforms.v2.functional
    images, _ = smooth_images(96, seed=3)
    p = tc.sample_view_params(96, torch.Generator().manual_seed(4))
    assert p["jitter"].any() and p["grayscale"].any() and p["solarize"].any() and p["flip"].any()
    jitter = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ref = []
    for k in range(96):
        box = [int(p[key][k]) for key in ("top", "left", "height", "width")]
        x = TF.resized_crop(images[k].float(), *box, [32, 32], antialias=True) / 255
        x = TF.horizontal_flip(x) if p["flip"][k] else x
        if p["jitter"][k]:
            for op in p["jitter_order"][k].tolist():
                x = jitter[op](x, float(p["factors"][k, op]))
        x = TF.rgb_to_grayscale(x, num_output_channels=3) if p["grayscale"][k] else x
        x = TF.solarize(x, 128 / 255) if p["solarize"][k] else x
        ref.append(TF.normalize(x, list(tc.CIFAR_MEAN), list(tc.CIFAR_STD)))
    ours = tc.augment_batch(images, p)
    assert ours.dtype == torch.float32 and ours.shape == (96, 3, 32, 32)
    std = torch.tensor(tc.CIFAR_STD).view(1, 3, 1, 1)
    assert ((ours - torch.stack(ref)) * std).abs().max() <= 1e-5


def test_batched_views_do_not_depend_on_the_number_of_ranks():
    """Two ranks' batches of one epoch, concatenated, are one process's batches of the global batch; the
    same (seed, epoch) gives the same views, another epoch other ones."""
    images, _ = smooth_images(40, seed=5)
    labels = torch.arange(40) % 10

    def epoch(e, rank=0, world=1):
        return list(tc.batched_epoch(images, labels, 3, e, 16, rank, world))
    one, halves = epoch(1), [epoch(1, r, 2) for r in range(2)]
    assert len(one) == 2 and all(len(b[0]) == 16 for b in one)
    for step, batch in enumerate(one):
        for part, whole in enumerate(batch):
            torch.testing.assert_close(torch.cat([halves[0][step][part], halves[1][step][part]]), whole)
    assert torch.equal(epoch(1)[0][0], one[0][0]) and not torch.equal(epoch(2)[0][0], one[0][0])


def test_batched_views_do_not_depend_on_how_many_steps_are_augmented_at_once():
    """batched_epoch makes the views of several steps in one call: step by step (chunk 1), in chunks
    of 2 and 8 steps, the batches of an epoch are the same, each step's views its own draw."""
    images, _ = smooth_images(80, seed=7)
    labels = torch.arange(80) % 10
    by_chunk = {c: list(tc.batched_epoch(images, labels, 3, 1, 16, 0, 1, chunk=c)) for c in (1, 2, 8)}
    assert len(by_chunk[1]) == 5 and not torch.equal(by_chunk[1][0][0], by_chunk[1][1][0])
    for c in (2, 8):
        for mine, ref in zip(by_chunk[c], by_chunk[1], strict=True):
            for part, whole in zip(mine, ref):
                torch.testing.assert_close(part, whole, rtol=0, atol=1e-6)


def write_image_folder(root, images, labels, ext):
    for split, rows in (("train", slice(0, 30)), ("test", slice(30, 40))):
        for name in tc.CIFAR10_CLASSES:
            os.makedirs(os.path.join(root, split, name))
        for i in range(40)[rows]:
            path = os.path.join(root, split, tc.CIFAR10_CLASSES[labels[i]], f"{i:04d}.{ext}")
            (torchvision.io.write_png if ext == "png" else torchvision.io.write_jpeg)(images[i], path)


def test_train_cifar_reads_an_image_folder(tmp_path):
    """--data with train/<class>/ and test/<class>/ (PNG: the pixels as written; JPEG: as torchvision
    decodes each file), labels in CIFAR-10's order, a class-mixed fixed order; clear errors for
    a wrong layout or image."""
    images, _ = smooth_images(40, seed=6)
    labels = (torch.arange(40) % 10).tolist()
    write_image_folder(str(tmp_path / "png"), images, labels, "png")
    train_x, train_y, test_x, test_y = tc.load_splits(str(tmp_path / "png"), 0)
    assert train_x.shape == (30, 3, 32, 32) and train_x.dtype == torch.uint8 and len(test_x) == 10
    by_image = {images[i].numpy().tobytes(): labels[i] for i in range(40)}
    assert all(by_image[x.numpy().tobytes()] == y for x, y in zip(torch.cat([train_x, test_x]),
                                                                  torch.cat([train_y, test_y]).tolist()))
    assert len(set(train_y[:10].tolist())) > 3  # not sorted by class
    write_image_folder(str(tmp_path / "jpg"), images, labels, "jpg")
    train_j = tc.load_splits(str(tmp_path / "jpg"), 0)[0]
    files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path / "jpg" / "train") for f in names]
    decoded = {torchvision.io.decode_image(f).numpy().tobytes() for f in files}
    assert len(files) == 30 and {x.numpy().tobytes() for x in train_j} == decoded
    assert torch.equal(tc.load_splits(str(tmp_path / "jpg"), 20)[0], train_j[:20])
    (tmp_path / "jpg" / "test" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    assert len(tc.load_splits(str(tmp_path / "jpg"), 0)[2]) == 10
    os.rename(tmp_path / "jpg" / "test" / "cat", tmp_path / "jpg" / "test" / "kitten")
    with pytest.raises(SystemExit, match="one folder per CIFAR-10 class.*kitten"):
        tc.load_splits(str(tmp_path / "jpg"), 0)
    os.rename(tmp_path / "jpg" / "test", tmp_path / "jpg" / "held_out")
    with pytest.raises(SystemExit, match="holds train/ but not test/"):
        tc.load_splits(str(tmp_path / "jpg"), 0)
    (tmp_path / "png" / "train" / "cat" / "0003.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="0003.png is not a readable image"):
        tc.load_splits(str(tmp_path / "png"), 0)


def test_train_cifar_two_processes(fake_cifar, tmp_path):
    """torchrun, gloo: the script itself checks at every epoch that both ranks hold identical
    weights, online probe and running moments (it stops otherwise)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_cifar.py", *cifar_args(fake_cifar, tmp_path, "--epochs", "1", "--loss", "peira_direct")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "step" in r]
    assert len(steps) == 2  # 128 images, global batch 64: each rank ran 2 steps of 32
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["world_size"] == 2


def test_only_rank_0_downloads_cifar(two_rank_results):
    """Under torchrun rank 0 alone downloads CIFAR-10 (the download is faked); rank 1 waits and
    reads the same images."""
    ranks, downloads = two_rank_results[:2]
    assert downloads == ["download0"]
    a, b = ranks[0]["train_x"], ranks[1]["train_x"]
    assert a.shape == (20, 3, 32, 32) and torch.equal(a, b)


def test_train_cifar_bad_input(fake_cifar, tmp_path, monkeypatch):
    calls = []

    def offline(root):
        calls.append(root)
        raise OSError("no network in the tests")
    monkeypatch.setattr(tc, "download_cifar", offline)
    with pytest.raises(SystemExit, match="(?s)CIFAR-10 not found at .*nowhere.*no network in the tests"):
        tc.main(cifar_args(str(tmp_path / "nowhere"), tmp_path, "--epochs", "1"))
    assert calls == [str(tmp_path / "nowhere")]
    with pytest.raises(SystemExit):
        tc.main(cifar_args(fake_cifar, tmp_path, "--lam", "-1"))
    with pytest.raises(SystemExit):
        tc.main(cifar_args(fake_cifar, tmp_path, "--allow-change", "epochz"))
    with pytest.raises(SystemExit, match="no checkpoint"):
        tc.main(cifar_args(fake_cifar, tmp_path / "empty", "--resume"))
    # a diverging run stops at the step that produced a non-finite value and saves nothing
    with pytest.raises(FloatingPointError, match="step"):
        tc.main(cifar_args(fake_cifar, tmp_path / "nan", "--epochs", "1", "--optimizer", "sgd",
                                    "--lr", "1e30", "--clip", "0", "--warmup-epochs", "0"))
    assert not (tmp_path / "nan" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# train_imagenet.py on a tiny ImageFolder of generated JPEGs

@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, colour in enumerate(([200, 40, 40], [40, 40, 200])):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = torch.tensor(colour).view(3, 1, 1) + 30 * torch.randn(3, 40, 48, generator=g)
                img = img.clamp(0, 255)
                torchvision.io.write_jpeg(img.to(torch.uint8), str(folder / f"{i}.JPEG"))
    return str(root)


def imagenet_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--image-size", "32", "--proj", "64-64-32",
            "--batch-size", "16", "--workers", "0", "--no-bf16", "--warmup-epochs", "1", *extra]


def test_train_imagenet_two_ranks_hold_the_moments_of_the_concatenated_batch(tiny_imagefolder, tmp_path):
    """torchrun, 2 ranks (gloo): after the first step (η = 1) the running moments are the moments
    of the global batch; recomputed here in one process from the same images, views and weights.
    The script checks that both ranks hold identical weights, probe and moments."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_imagenet.py", *imagenet_args(tiny_imagefolder, tmp_path, "--epochs", "1")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)
    model = ti.SSLModel("peira", [64, 64, 32]).to(memory_format=torch.channels_last)  # as in the script
    dataset = ti.TwoViews(os.path.join(tiny_imagefolder, "train"), 32, seed=0)
    us, vs = [], []
    for rank in range(2):  # each rank's 8 images, through the same initial weights (local BN on CPU)
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, 2, rank, seed=0, drop_last=True)
        items = [dataset[i] for i in list(sampler)[:8]]
        x1, x2 = (torch.stack([t[j] for t in items]).contiguous(memory_format=torch.channels_last)
                  for j in (0, 1))
        _, z1, z2, _, _ = model(x1, x2)
        us.append(z1.detach()); vs.append(z2.detach())
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
    common = imagenet_args(tiny_imagefolder, tmp_path / "straight", "--epochs", "2", "--batch-size", "8")
    ti.main(common)
    resumed = imagenet_args(tiny_imagefolder, tmp_path / "resumed", "--epochs", "2", "--batch-size", "8")
    ti.main(resumed + ["--stop-after", "1"])
    with pytest.raises(SystemExit, match="proj: checkpoint '64-64-32', now '64-64-16'"):
        ti.main(imagenet_args(tiny_imagefolder, tmp_path / "resumed", "--epochs", "2", "--batch-size", "8",
                              "--proj", "64-64-16"))
    ti.main(resumed)  # the checkpoint in --out is picked up, as after a preemption
    a = [r for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl") if "step" in r]
    b = [r for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in b] == [0, 1, 2, 3] and [r["loss"] for r in a] == [r["loss"] for r in b]
    res = ti.main(imagenet_args(tiny_imagefolder, tmp_path, "--eval", str(tmp_path / "resumed" / "ckpt.pt"),
                                "--probe-epochs", "30", "--probe-batch", "8"))
    # 8 val images of 2 colour-tinted classes: the probe gets all 8 right (with probe seeds 0-5 too);
    # a probe that learned nothing reaches 7 of 8 with probability 9/256
    assert res["top1"] >= 0.875 and res["epoch"] == 2 and res["train_features"] == 16
    with pytest.raises(SystemExit, match="train not found"):
        ti.main(imagenet_args(str(tmp_path / "nowhere"), tmp_path))


def test_train_imagenet_eval_on_two_ranks_keeps_the_features_on_rank_0(two_rank_results):
    """2 ranks: rank 0 alone gathers the 16 training features (not every rank: 10 GB each on
    ImageNet) and trains the probe; its result is that of one process."""
    ranks, _, argv, _ = two_rank_results
    assert ranks[1]["gather"] == (None, None)
    features, labels = ranks[0]["gather"]  # uneven shards back in the split's order
    assert torch.equal(labels, torch.arange(5))
    assert torch.equal(features, torch.arange(5.0)[:, None].expand(5, 3))
    assert ranks[1]["imagenet_eval"] is None and ranks[0]["imagenet_eval"]["train_features"] == 16
    single = ti.main(argv)
    assert ranks[0]["imagenet_eval"] == single


def test_train_imagenet_layout_and_argument_errors(tmp_path):

    def layout(train, val):
        root = tmp_path / f"layout{len(list(tmp_path.iterdir()))}"
        for split, classes in (("train", train), ("val", val)):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                if not c.startswith("empty"):
                    (root / split / c / "0.JPEG").touch()
        return str(root)
    assert ti.check_layout(layout(["a", "b"], ["a", "b"])) == ["a", "b"]
    with pytest.raises(SystemExit, match="only in train/: b; only in val/: none"):
        ti.check_layout(layout(["a", "b", "c"], ["a", "c"]))
    with pytest.raises(SystemExit, match="only in train/: none; only in val/: d"):
        ti.check_layout(layout(["a", "b"], ["a", "b", "d"]))
    with pytest.raises(SystemExit, match=r"hidden folders \(.ipynb_checkpoints\)"):
        ti.check_layout(layout(["a", ".ipynb_checkpoints"], ["a"]))
    with pytest.raises(SystemExit, match="without images .*: empty1"):
        ti.check_layout(layout(["a", "empty1"], ["a", "empty1"]))
    good = layout(["a"], ["a"])
    for bad in (["--accum-steps", "0"], ["--allow-change", "nonsense"], ["--proj", "64-x"], ["--proj", "0"],
                ["--vicreg-coeffs", "1,1,1"], ["--loss", "vicreg", "--vicreg-coeffs", "1,1"]):
        with pytest.raises(SystemExit) as exc:
            ti.check_args(ti.parser.parse_args(["--data", good, *bad]))  # main calls it first
        assert exc.value.code == 2  # a parser error, not a traceback
    args = ti.parser.parse_args(["--data", good, "--loss", "vicreg"])
    ti.check_args(args)  # VICReg's own recipe
    assert (args.proj, args.lr, args.min_lr, args.wd, args.clip) == ("8192-8192-8192", 1.6, 1.6e-3, 1e-6, 0.0)
    args = ti.parser.parse_args(["--data", good])
    ti.check_args(args)
    assert (args.proj, args.lr, args.min_lr, args.clip) == ("8192-8192-256", 2.4, 2e-3, 1.0)


# -----------------------------------------------------------------------------
# two_rooms.py and plan.py

def test_two_rooms_dynamics_and_rendering():
    right = torch.full((20,), 3)
    blocked = torch.tensor([[27.0, 40.0]])
    for a in right:  # the wall blocks
        blocked = tr.move(blocked, a)
    assert blocked[0, 0] < tr.WALL_X - tr.WALL_HALF and blocked[0, 1] == 40.0
    through = torch.tensor([[27.0, tr.DOOR_Y]])
    for a in right:  # the door passes, the border blocks
        through = tr.move(through, a)
    assert tr.ARENA - tr.BORDER - tr.MARGIN - tr.STEP < through[0, 0] <= tr.ARENA - tr.BORDER - tr.MARGIN
    up = tr.move(torch.tensor([[10.0, 6.0]]), torch.tensor([0]))
    assert torch.equal(up, torch.tensor([[10.0, 6.0]]))  # border above
    obs = tr.render(torch.tensor([[21.0, 41.0], [51.0, 13.0]]), 32)  # pixel centres: 2i + 1
    assert obs.shape == (2, 2, 32, 32) and obs.min() >= 0 and obs.max() <= 1
    peak = obs[:, 0].flatten(1).argmax(1)
    assert (peak // 32).tolist() == [20, 6] and (peak % 32).tolist() == [10, 25]  # row from y, column from x
    walls = obs[0, 1]
    assert walls[:, 16].sum() > 20 and walls[5, 16] == 0  # wall column, door rows open
    assert walls[20, 16] == 0.75  # the wall covers 1.5 of this pixel's 2 units (area-weighted)
    env = tr.TwoRooms(res=32)
    o, info = env.reset(seed=3)
    o2, reward, terminated, truncated, info2 = env.step(3)
    assert o.shape == o2.shape == (2, 32, 32) and reward in (0.0, 1.0) and not truncated


def test_two_rooms_data_cross_the_door_as_often_as_asked():
    n = 2000
    base, _ = tr.random_trajectories(n, 48, seed=0, door_fraction=0.0)
    half, half_actions = tr.random_trajectories(n, 48, seed=0, door_fraction=0.5)
    every, _ = tr.random_trajectories(n, 48, seed=0, door_fraction=1.0)
    assert torch.equal(tr.move(half[:, :-1], half_actions), half[:, 1:]) and tr.free(half).all()
    assert tr.crossing_fraction(every) == 1.0  # every guided trajectory gets through the door
    p0 = tr.crossing_fraction(base)            # the random policy alone crosses rarely
    expected = 0.5 + 0.5 * p0                  # guided half, plus the others' own crossings
    assert p0 < 0.15 and abs(tr.crossing_fraction(half) - expected) < 4 * math.sqrt(0.25 / n)
    nodoor, _ = tr.random_trajectories(n, 48, seed=0, door_fraction=0.0, no_door=True)
    assert tr.crossing_fraction(nodoor) == 0 and len(nodoor) < n


def test_two_rooms_data_cache_is_keyed_by_every_generation_parameter(tmp_path, monkeypatch):
    args = tr.parser.parse_args(["--out", str(tmp_path), "--trajectories", "64", "--length", "16"])
    pos, actions = tr.load_data(args)
    assert pos.shape == (64, 17, 2) and actions.shape == (64, 16)
    again, _ = tr.load_data(args)
    assert torch.equal(pos, again) and len(list(tmp_path.glob("data_*.pt"))) == 1
    paths = {tr.data_path(args)}
    for flag, value in [("trajectories", 65), ("length", 17), ("seed", 1), ("door_fraction", 0.3),
                        ("no_door_data", True)]:
        changed = tr.parser.parse_args(["--out", str(tmp_path), "--trajectories", "64", "--length", "16"])
        setattr(changed, flag, value)
        paths.add(tr.data_path(changed))
    for constant in ["MOMENTUM", "GUIDE_NOISE", "DOOR_APPROACH", "STEP", "MARGIN", "ARENA", "BORDER",
                     "WALL_X", "WALL_HALF", "DOOR_Y", "DOOR_HALF", "DATA_VERSION"]:
        with monkeypatch.context() as m:
            m.setattr(tr, constant, getattr(tr, constant) + 1)
            paths.add(tr.data_path(args))
    assert len(paths) == 1 + 5 + 12


@pytest.mark.parametrize("predictor", ["mlp", "gru"])
def test_world_model_predictions_reach_beyond_the_unit_range(predictor):
    """A GRU state alone stays in (−1, 1) from a start inside it; the embeddings do not (LayerNorm):
    the predictor's outputs must be able to reach them."""
    torch.manual_seed(0)
    model = tr.WorldModel(16, 8, predictor)
    z = model.encode(tr.render(torch.tensor([[20.0, 30.0], [40.0, 50.0]]), 16))
    pred = model.rollout(torch.zeros(2, 8), torch.tensor([[3, 3, 1], [0, 2, 2]]))
    for e in (z, pred):  # LayerNorm at its initial affine map: zero mean, unit variance per sample
        assert e.abs().amax() > 1
        assert torch.allclose(e.mean(-1), torch.zeros(()), atol=1e-5)
        variance = e.var(-1, unbiased=False)                  # below 1 by LayerNorm's eps only
        assert (variance > 0.95).all() and (variance < 1 + 1e-5).all()


@pytest.mark.parametrize("center", [False, True])
def test_peira_world_model_loss_with_per_horizon_moments(center):
    """--moments per-horizon: one PEIRALoss per horizon h on the pairs (prediction h, embedding h);
    with η 1 each holds its batch's moments, so its objective is peira_objective of those pairs
    (computed directly, centred or not); pooled moments read all horizons' pairs at once."""
    torch.manual_seed(0)
    model = tr.WorldModel(16, 6)
    obs = tr.render(tr.sample_free(40 * 4, torch.Generator().manual_seed(1)).view(40, 4, 2), 16)
    actions = torch.randint(0, 4, (40, 3))
    per_horizon = nn.ModuleList(peira.PEIRALoss(6, lam=0.3, eta=1.0, center=center) for _ in range(3))
    pooled = peira.PEIRALoss(6, lam=0.3, eta=1.0, center=center)
    loss, _ = tr.world_model_loss("peira", model, obs, actions, per_horizon, None, None)
    assert loss.requires_grad and torch.isfinite(loss)
    tr.world_model_loss("peira", model, obs, actions, pooled, None, None)
    with torch.no_grad():
        z = model.encode(obs).double()
        pred = model.rollout(z[:, 0].float(), actions).double()
    for h, loss_h in enumerate(per_horizon):
        expected = peira.peira_objective(pred[:, h], z[:, h + 1], 0.3, center=center)
        assert abs(loss_h.objective() - expected.item()) < 1e-4
    expected = peira.peira_objective(pred.reshape(-1, 6), z[:, 1:].reshape(-1, 6), 0.3, center=center)
    assert abs(pooled.objective() - expected.item()) < 1e-4


def test_pldm_loss_terms_match_a_direct_computation():
    torch.manual_seed(0)
    B, T, D = 12, 5, 6
    z = torch.randn(B, T + 1, D, dtype=torch.float64)
    pred = torch.randn(B, T, D, dtype=torch.float64)
    actions = torch.randint(0, 4, (B, T))
    idm = nn.Linear(2 * D, 4).double()

    class Fixed:  # a model whose encoder and predictor return the tensors above
        latent = D
        def encode(self, obs): return z
        def rollout(self, z0, a): return pred

    loss, parts = tr.world_model_loss("pldm", Fixed(), None, actions, None, idm, None)
    x = z[:, 0]                                                         # variance, covariance: first frame
    var = sum(max(0.0, 1 - math.sqrt(x[:, d].var().item() + 1e-4)) for d in range(D)) / D
    cov = torch.cov(x.T)
    cov = sum(cov[i, j].item() ** 2 for i in range(D) for j in range(D) if i != j) / (D * (D - 1))
    var_t = sum(max(0.0, 1 - math.sqrt(z[b, 1:, d].var().item() + 1e-4))
                for b in range(B) for d in range(D)) / (B * D)                 # temporal variance
    sim_t = sum(((z[b, t + 1] - z[b, t]) ** 2).mean().item() for b in range(B) for t in range(T)) / (B * T)
    pred_mse = ((pred - z[:, 1:]) ** 2).mean().item()
    logits = idm(torch.cat([z[:, :-1], z[:, 1:]], -1))
    inv = nn.functional.cross_entropy(logits.reshape(-1, 4), actions.reshape(-1)).item()
    c = tr.PLDM_COEFFS
    expected = (c["pred"] * pred_mse + c["var"] * var + c["cov"] * cov + c["var_t"] * var_t
                + c["sim_t"] * sim_t + c["idm"] * inv)
    for key, value in [("var", var), ("cov", cov), ("var_t", var_t), ("sim_t", sim_t), ("pred", pred_mse)]:
        assert parts[key] == pytest.approx(value, rel=1e-9), key
    assert loss.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("loss", ["peira", "pldm", "lewm"])
def test_each_world_model_loss_decreases_on_a_small_batch(loss):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    pos, actions = tr.random_trajectories(32, 12, seed=0, door_fraction=0.5)
    p, a = tr.sample_windows(pos, actions, 16, 4, gen)
    obs = tr.render(p, 16)
    model = tr.WorldModel(16, 8)
    idm = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    peira_loss = peira.PEIRALoss(8, lam=0.1, eta=1.0)
    opt = torch.optim.Adam([*model.parameters(), *idm.parameters()], lr=3e-3)

    def measure():  # PEIRA's aux loss is not its objective: measure the objective itself
        if loss != "peira":
            gen_fixed = torch.Generator().manual_seed(1)
            return tr.world_model_loss(loss, model, obs, a, peira_loss, idm, gen_fixed)[0].item()
        z = model.encode(obs)
        pred = model.rollout(z[:, 0], a)
        return peira.peira_objective(pred.reshape(-1, 8), z[:, 1:].reshape(-1, 8), 0.1).item()

    before = measure()
    for _ in range(40):
        value, _ = tr.world_model_loss(loss, model, obs, a, peira_loss, idm, gen)
        opt.zero_grad()
        value.backward()
        opt.step()
    assert measure() < before


def test_segment_sequences_are_piecewise_constant():
    seq = plan.segment_sequences(5, 64, 20, 3, torch.Generator().manual_seed(0))
    changes = (seq[..., 1:] != seq[..., :-1]).sum(-1)
    assert seq.shape == (5, 64, 20) and changes.max() == 2 and (changes == 0).any()
    assert set(seq.unique().tolist()) == {0, 1, 2, 3}


def test_planner_with_the_true_dynamics_reaches_95_percent_of_cross_room_pairs():
    """The planner's ceiling: with the true dynamics and a wall-blind cost it must find the door."""
    starts, goals = tr.start_goal_pairs(20, 7)
    assert ((starts[:, 0] < tr.WALL_X) != (goals[:, 0] < tr.WALL_X)).all()  # always across the wall
    field = plan.DistanceField(starts, goals)
    args = plan.parser.parse_args([])
    gen = torch.Generator().manual_seed(0)
    planner = plan.Planner(plan.true_distances(goals), 20, args, gen)
    success, steps, _, _ = plan.run_episodes(planner, starts, goals)
    oracle_success, oracle_steps, _, _ = plan.run_episodes(lambda pos, ep: plan.oracle_action(field, pos, ep),
                                                           starts, goals)
    assert success.float().mean() >= 0.95
    assert oracle_success.all()
    assert torch.equal(oracle_steps.float(), field(starts[:, None], torch.arange(20))[:, 0])
    assert (steps >= oracle_steps).all()  # nothing beats the shortest path


@pytest.mark.parametrize("predictor,regressed", [("mlp", False), ("mlp", True), ("gru", False)])
def test_latent_distances_equal_those_of_the_model_rollout(predictor, regressed):
    """plan.latent_distances keeps one distance per step of its rollout, and predicts a step once for the
    sequences that agree so far (rollout_distances): the same numbers as the distances of model.rollout's
    embeddings of every sequence alone (to rounding: other matrix shapes), for runs of every length:
    sequences that change after their first action, halfway, never, and one episode or several."""
    torch.manual_seed(0)
    model = tr.WorldModel(16, 8, predictor).eval()
    starts, goals = tr.start_goal_pairs(3, 0)
    seq = plan.segment_sequences(3, 9, 7, 3, torch.Generator().manual_seed(0))
    seq[0, 0] = 2  # never changes
    seq[1, 0] = torch.tensor([1, 3, 3, 3, 3, 3, 3])  # changes after its first action
    seq[2, :2] = torch.tensor([0, 0, 0, 1, 1, 1, 0])  # two that change at step 3
    regressor = torch.randn(8, 8) if regressed else None
    episodes = torch.tensor([2, 0, 1])  # the goals of other episodes than the rows' order
    for rows in (slice(0, 3), slice(1, 2)):
        predicted, current = plan.latent_distances(model, goals, regressor)(starts[rows], episodes[rows],
                                                                            seq[rows])
        with torch.no_grad():
            z0 = model.encode(tr.render(starts[rows], 16))
            goal = model.encode(tr.render(goals, 16))[episodes[rows]]
            pred = model.rollout(z0.repeat_interleave(9, 0), seq[rows].flatten(0, 1)).reshape(-1, 9, 7, 8)
            pred = pred if regressor is None else pred @ regressor.T
            expected = (pred - goal[:, None, None]).norm(dim=-1)
        assert torch.equal(current, (z0 - goal).norm(dim=-1))
        torch.testing.assert_close(predicted, expected, rtol=1e-6, atol=1e-6)


def test_planner_remembers_the_moves_a_wall_blocked():
    """A model blind to the wall (positions move freely; cost: the distance to a goal across it) walks
    into the wall and, with --no-remember-blocked, pushes against it for the rest of the episode. With
    --remember-blocked (the default) no move is tried again from where it was blocked (the model still
    believes the wall passable from elsewhere: the agent then walks up and down along it)."""
    starts, goals = torch.tensor([[24.0, 40.0]]), torch.tensor([[40.0, 40.0]])

    def wall_blind(pos, episodes, seq):
        position, out = pos[:, None].expand(-1, seq.shape[1], -1), []
        for t in range(seq.shape[2]):
            position = position + tr.STEP * tr.MOVES[seq[:, :, t]]
            out.append((position - goals[episodes, None]).norm(dim=-1))
        return torch.stack(out, -1), (pos - goals[episodes]).norm(dim=-1)

    def run(flags):
        args = plan.parser.parse_args(["--horizon", "16", "--samples", "32"] + flags)
        planner = plan.Planner(wall_blind, 1, args, torch.Generator().manual_seed(0))
        actions = []

        def policy(pos, episodes):
            actions.append(planner(pos, episodes).item())
            return torch.tensor([actions[-1]])
        _, _, path, _ = plan.run_episodes(policy, starts, goals)
        path = path[0]
        # (when, where, which move) of every blocked move
        return [(t, tuple(path[t].tolist()), action) for t, action in enumerate(actions)
                if torch.equal(path[t + 1], path[t])]

    blocked = [(where, move) for _, where, move in run(["--no-remember-blocked"])]
    assert len(blocked) > 150 and len(set(blocked)) == 1  # one move into the wall, again and again
    blocked = [(where, move) for _, where, move in run([])]
    assert blocked and len(set(blocked)) == len(blocked)  # each blocked move tried once from a position
    # planning every 4 steps, a blocked move ends its plan at once: never the same one twice in a row
    blocked = run(["--replan", "4"])
    assert blocked and not any(a[0] + 1 == b[0] and a[1:] == b[1:] for a, b in zip(blocked, blocked[1:]))


@pytest.mark.parametrize("cheaper, error, flags, kept", [(0.05, True, [], True), (0.12, True, [], False),
                                                        (0.05, False, [], False),
                                                        (0.05, True, ["--no-keep-plan"], False),
                                                        (0.12, True, ["--margin-scale", "2"], True),
                                                        (0.05, True, ["--margin-scale", "0.5"], False),
                                                        (0.05, True, ["--margin-scale", "0.6"], True)])
def test_planner_keeps_its_plan_unless_a_new_one_is_cheaper_by_more_than_the_model_error(cheaper, error,
                                                                                         flags, kept):
    """The current distance is 2 and the model's error after t + 1 steps 0.02 + 0.38 t / 7. First plan:
    sequence 5 reaches 0.5 of the current distance at its second step, sequence 0 (no plan kept yet: no
    margin) 0.51, so sequence 5 becomes the plan. Second plan: the kept plan (shifted to now, the first
    candidate) reaches 0.5 at its fourth step, where the margin is error[3] / 2 = 0.091; sequence 7 reaches
    0.5 − `cheaper` there. A sequence 0.05 cheaper leaves the plan as it was, one 0.12 cheaper replaces it
    (a margin read at another step, or not divided by the current distance, would decide one of the two
    otherwise); with no error (the true dynamics) or --no-keep-plan the cheaper one wins. --margin-scale 2
    doubles the margin (0.182: the plan stays against 0.12), 0.5 halves it (0.046: 0.05 replaces it), 0.6
    makes it 0.055 (the plan stays against 0.05; 0.033 if the scale were squared)."""
    horizon, samples, candidates = 8, 16, []

    def distances(pos, episodes, seq):
        predicted = torch.full(seq.shape, 2.0)
        if candidates:
            predicted[0, 0, 3], predicted[0, 7, 3] = 2 * 0.5, 2 * (0.5 - cheaper)
        else:
            predicted[0, 5, 1], predicted[0, 0, 1] = 2 * 0.5, 2 * 0.51
        candidates.append(seq[0].clone())
        return predicted, torch.full((len(pos),), 2.0)

    args = plan.parser.parse_args(["--horizon", str(horizon), "--samples", str(samples)] + flags)
    error = torch.linspace(0.02, 0.4, horizon) if error else None
    planner = plan.Planner(distances, 1, args, torch.Generator().manual_seed(0), error)
    planner(torch.tensor([[20.0, 30.0]]), torch.tensor([0]))
    first = candidates[0]
    assert torch.equal(planner.best[0], first[5])
    planner(torch.tensor([[22.0, 30.0]]), torch.tensor([0]))
    second = candidates[1]
    assert torch.equal(second[0], first[5, (torch.arange(horizon) + 1).clamp(max=horizon - 1)])
    assert not torch.equal(second[0], second[7])
    assert torch.equal(planner.best[0], second[0] if kept else second[7])


@pytest.mark.parametrize("regressed", [False, True])
def test_open_loop_error_is_the_rms_error_of_the_models_rollouts(regressed):
    """open_loop_error against the model's full rollout on the same held-out trajectories, drawn as the
    model's data were (here: without door crossings)."""
    torch.manual_seed(0)
    model = tr.WorldModel(16, 8).eval()
    regressor = torch.randn(8, 8) if regressed else None
    pos, actions = tr.random_trajectories(256, 6, plan.ERROR_SEED, 0.0, True)
    n = len(pos)
    with torch.no_grad():
        z = model.encode(tr.render(pos.reshape(-1, 2), 16)).reshape(n, 7, 8)
        pred = model.rollout(z[:, 0], actions)
    pred = pred if regressor is None else pred @ regressor.T
    expected = torch.stack([(pred[:, t] - z[:, t + 1]).norm(dim=-1).square().mean().sqrt() for t in range(6)])
    torch.testing.assert_close(plan.open_loop_error(model, 6, regressor, (0.0, True)), expected)


def test_failure_kinds_tell_near_misses_walls_and_wandering_apart():
    """Five episodes from (20, 40) to (44, 40), across the wall: one succeeds (not a failure); one walks
    the shortest path to 2 steps from the goal and then steps back and forth; one pushes right into the
    wall from step 4 on; one walks up and down in its room; one pushes into the wall for 36 steps, then
    walks up and down (elsewhere: only its last 40 moves count)."""
    starts, goals = torch.tensor([[20.0, 40.0]]).repeat(5, 1), torch.tensor([[44.0, 40.0]]).repeat(5, 1)
    field = plan.DistanceField(starts, goals)
    up, down, right = 0, 1, 3
    pos, near = starts[:1], []
    while field(pos, torch.tensor([0])).item() > 2:  # the shortest path, to 2 steps from the goal
        pos = tr.move(pos, plan.oracle_action(field, pos, torch.tensor([0])))
        near.append(pos[0])
    near = near + [near[-2], near[-1]] * tr.MAX_STEPS

    def walk(actions):
        pos, out = starts[0], [starts[0]]
        for a in actions:
            pos = tr.move(pos, torch.tensor(a))
            out.append(pos)
        return torch.stack(out)
    near = torch.cat([starts[:1], torch.stack(near)])[:tr.MAX_STEPS + 1]
    paths = torch.stack([walk([right] * tr.MAX_STEPS), near, walk([right] * tr.MAX_STEPS),
                         walk([up, down] * (tr.MAX_STEPS // 2)), walk([right] * 40 + [up, down] * 80)])
    success = torch.tensor([True, False, False, False, False])
    assert (paths[2, 5:] == paths[2, 4]).all()  # the wall stops it at x = 28
    kinds = plan.failure_kinds(success, paths, field)
    assert kinds == {"came within 2 steps": 1, "against a wall": 1, "elsewhere": 2}  # the last 40 moves count
    assert plan.failure_kinds(torch.ones(5, dtype=torch.bool), paths, field) == dict.fromkeys(kinds, 0)


def test_distance_profile_reads_how_far_a_latent_distance_keeps_rising():
    """distance_profile on embeddings made of the true steps to the goal: z = steps correlates with them
    perfectly and rises to the farthest band (basin radius 48); z = min(steps, 20) is flat beyond 20
    steps, so its basin radius is the band [16, 24), whose mean is above 0.9 · 20, and every farther
    band reads 1. Shuffled across positions, the correlation is about 0; collapsed embeddings have no
    basin (None), without stopping the table."""
    goal = torch.tensor([[44.0, 30.0]])
    field = plan.DistanceField(goal, goal)

    def steps_to_goal(pos):
        return field(pos[None], torch.tensor([0]))[0][:, None]

    linear = plan.distance_profile(steps_to_goal, goal)
    assert linear["spearman"] == pytest.approx(1.0) and abs(linear["spearman_shuffled"]) < 0.1
    assert linear["basin_radius"] == 48 and linear["profile"][-1] == 1.0
    saturated = plan.distance_profile(lambda pos: steps_to_goal(pos).clamp(max=20), goal)
    assert saturated["basin_radius"] == 16 and saturated["profile"][3:] == pytest.approx([1.0] * 3)
    assert saturated["profile"][1] < 0.9
    with pytest.warns(Warning):  # scipy: a constant input has no correlation
        collapsed = plan.distance_profile(lambda pos: torch.zeros(len(pos), 2), goal)
    assert collapsed["basin_radius"] is None and math.isnan(collapsed["spearman"])  # a table cell, no crash


def test_two_rooms_and_plan_end_to_end(tmp_path):
    tr.main(["--out", str(tmp_path), "--steps", "4", "--trajectories", "64", "--length", "24", "--res", "16",
             "--batch-size", "8"])
    for name in ("peira", "pldm", "lewm"):
        assert (tmp_path / f"{name}.pt").exists() and (tmp_path / f"{name}.png").exists()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {h["model"] for h in logged if "prediction_error" in h} == {"peira", "pldm", "lewm"}
    peira_last = next(h for h in logged if h["model"] == "peira" and "prediction_error" in h)
    spectra = peira_last["regressor_eigenvalues_by_horizon"]  # the default: a regressor per horizon
    assert len(spectra) == tr.parser.get_default("horizon") and {len(s) for s in spectra} == {32}
    rows = plan.main(["--models", str(tmp_path), "--episodes", "4", "--out", str(tmp_path / "plan"),
                      "--samples", "16", "--horizon", "8"])
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["oracle (shortest path)", "random", "true dynamics + planner, position cost"]
    assert len(methods) == 6 and rows[0]["success"] == 1.0
    tr.main(["--out", str(tmp_path / "ablation"), "--losses", "pldm", "--without", "var,idm", "--steps", "2",
             "--trajectories", "16", "--length", "24", "--res", "16", "--batch-size", "4"])
    assert (tmp_path / "ablation" / "pldm-without-var-without-idm.pt").exists()
    with pytest.raises(SystemExit):
        tr.main(["--out", str(tmp_path), "--without", "variance"])
    with pytest.raises(SystemExit):
        plan.main(["--models", str(tmp_path), "--replan", "0"])
    for name in ("plan.json", "trajectories.png", "distance_maps.png"):
        assert (tmp_path / "plan" / name).exists()


@pytest.mark.parametrize("res", [16, 64])
def test_two_rooms_walls_are_drawn_by_the_area_they_cover(res):
    """Channel 1 holds the share of each pixel that the border and the wall cover: its sums are areas
    of the geometry, and the wall shows even where it is narrower than a pixel (0.75 px at 16 px)."""
    pos = torch.tensor([[20.0, 41.0]])
    obs = tr.render(pos, res)[0]
    walls, scale = obs[1].double(), res / tr.ARENA                  # scale: pixels per arena unit
    inner = tr.ARENA - 2 * tr.BORDER                                # the side inside the border
    wall_area = 2 * tr.WALL_HALF * (inner - 2 * tr.DOOR_HALF)       # 3 × 48 units, door excluded
    all_area = tr.ARENA ** 2 - inner ** 2 + wall_area               # border and wall
    left, right = (tr.WALL_X - tr.WALL_HALF) * scale, (tr.WALL_X + tr.WALL_HALF) * scale   # in pixels
    band = slice(math.floor(left), math.ceil(right))                # the columns the wall touches
    rows = slice(round(tr.BORDER * scale), round((tr.ARENA - tr.BORDER) * scale))   # pixel-aligned here
    assert walls[rows, band].sum().item() == pytest.approx(wall_area * scale ** 2, rel=1e-6)
    assert walls.sum().item() == pytest.approx(all_area * scale ** 2, rel=1e-6)
    row = walls[int(40 * scale), band]                              # a row below the door
    assert row[0].item() == pytest.approx(math.ceil(left) - left) and row.min() > 0
    assert row[-1].item() == pytest.approx(right - math.floor(right))
    assert walls[int(tr.DOOR_Y * scale), band].abs().max() == 0     # the door's row is open
    c = (torch.arange(res) + 0.5) / scale                           # the blob is unchanged: a Gaussian
    sigma = tr.BLOB_SIGMA / scale
    blob = torch.exp(-((c[:, None] - pos[0, 1]) ** 2 + (c[None] - pos[0, 0]) ** 2) / (2 * sigma ** 2))
    assert torch.allclose(obs[0], blob, atol=1e-6)
    # 20 px: pixels of 3.2 units straddle every edge of the border and the wall
    assert tr.wall_image(20).sum().item() == pytest.approx(all_area * (20 / tr.ARENA) ** 2, rel=1e-6)


def epps_pulley(x, t):
    """N ∫ e^{−t²/2} |φ̂(t) − e^{−t²/2}|² dt for samples x (N,), by torch.trapezoid on the grid t,
    with the empirical characteristic function φ̂ computed in complex numbers."""
    ecf = torch.exp(1j * t[:, None] * x[None]).mean(1)
    gaussian = torch.exp(-t ** 2 / 2)
    return len(x) * torch.trapezoid(gaussian * (ecf - gaussian).abs() ** 2, t)


# 2001 points over the whole of [−3, 3]; the 17 knots of LeWM's rule miss it by < 4e-4 (relative) on
# Gaussian, skewed, scaled, shifted, uniform and bimodal samples (20 seeds each): 2e-3 leaves room
FINE_T = torch.linspace(-3, 3, 2001, dtype=torch.float64)


@pytest.mark.parametrize("data", ["gaussian", "skewed"])
def test_sigreg_is_the_epps_pulley_integral_over_minus_3_to_3(data):
    """LeWM's SIGReg on frames (F, N, D) with fixed projections: the mean over frames and directions
    of the Epps–Pulley statistic, against a fine numerical integral (the old rule gave half)."""
    torch.manual_seed(0)
    z = torch.randn(3, 256, 4, dtype=torch.float64)
    z = z.exp() / 2 if data == "skewed" else z
    directions = torch.randn(4, 8, dtype=torch.float64)
    units = directions / directions.norm(dim=0)
    expected = torch.stack([epps_pulley(frame @ u, FINE_T) for frame in z for u in units.T]).mean()
    assert tr.sigreg(z, None, directions).item() == pytest.approx(expected.item(), rel=2e-3)


def test_sigreg_value_and_gradient_equal_its_17_knot_rule_through_autograd():
    """sigreg's recurrence and closed-form gradient against the same rule written directly: the
    trapezoid on the 33 knots of [−3, 3] (that is, the doubled 17 knots of [0, 3]) of the complex
    characteristic function, differentiated by autograd in float64; 200 directions (two chunks)."""
    torch.manual_seed(0)
    directions = torch.randn(5, 200, dtype=torch.float64)
    units = directions / directions.norm(dim=0)
    knots = torch.linspace(-3, 3, 2 * tr.SIGREG_KNOTS - 1, dtype=torch.float64)
    for shape in [(2, 64, 5), (64, 5)]:  # frames of samples, or samples alone
        z = (torch.randn(*shape, dtype=torch.float64) * 1.5 + 0.3).requires_grad_()
        frames = z if z.ndim == 3 else z[None]
        expected = torch.stack([epps_pulley(frame @ u, knots) for frame in frames for u in units.T]).mean()
        value = tr.sigreg(z, None, directions)
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
        grad, grad_expected = (torch.autograd.grad(x, z)[0] for x in (value, expected))
        torch.testing.assert_close(grad, grad_expected, rtol=1e-9, atol=1e-12)


def test_sigreg_draws_1024_directions_and_integrates_over_both_signs_of_t():
    """One dimension: every unit direction is ±1, and the statistic is even in the sign, so the
    random directions drawn by default give the integral exactly; LeWM draws 1024 a call."""
    torch.manual_seed(0)
    z = 1.3 * torch.randn(512, 1) + 0.2
    expected = epps_pulley(z[:, 0].double(), FINE_T).item()
    assert tr.sigreg(z, torch.Generator().manual_seed(0)).item() == pytest.approx(expected, rel=2e-3)
    assert tr.SIGREG_DIRECTIONS == 1024


@pytest.fixture(scope="module")
def tiny_two_rooms(tmp_path_factory):
    """PEIRA (pooled moments: its checkpoint holds its regressor) and LeWM world models, seed 0, trained 2
    steps on 16 trajectories."""
    out = tmp_path_factory.mktemp("two_rooms")
    tr.main(["--out", str(out), "--losses", "peira,lewm", "--steps", "2", "--trajectories", "16", "--length",
             "24", "--batch-size", "4", "--latent", "8", "--moments", "pooled"])
    return out


def test_plan_rows_are_the_same_planned_alone_or_with_others(tiny_two_rooms, tmp_path, monkeypatch):
    monkeypatch.setattr(tr, "MAX_STEPS", 25)  # short episodes: a test's budget
    paths = []
    monkeypatch.setattr(plan, "figure", lambda *args: paths.append(args[0]))  # every row's paths
    monkeypatch.setattr(plan, "distance_maps", lambda *args: None)
    flags = ["--episodes", "3", "--samples", "8", "--horizon", "8", "--out", str(tmp_path)]
    peira_path, lewm_path = tiny_two_rooms / "peira.pt", tiny_two_rooms / "lewm.pt"
    alone = plan.main(["--models", str(peira_path), *flags])
    together = plan.main(["--models", f"{lewm_path},{peira_path}", *flags])  # LeWM's row plans first
    for method in ("random", "true dynamics + planner, position cost", "peira + planner"):
        row_alone, = [row for row in alone if row["method"] == method]
        row_together, = [row for row in together if row["method"] == method]
        assert row_alone["success"] == row_together["success"], method
        assert torch.equal(paths[0][method], paths[1][method]), method


def test_plan_summary_of_separate_runs_equals_the_summary_of_one_run(tiny_two_rooms, tmp_path, monkeypatch,
                                                                      capsys):
    """Every row of plan.py's table (one per model checkpoint) draws from its own random generator,
    seeded from --seed and the row's name, so the summary over training seeds that --summary builds
    from two runs' plan.json files equals the one from a single run that plans both; a later file's row
    replaces a same-named one; runs with other planner settings are refused, but for the settings tuned
    for each objective (--margin-scale), which are printed."""
    monkeypatch.setattr(tr, "MAX_STEPS", 25)
    monkeypatch.setattr(plan, "distance_maps", lambda *args: None)
    flags = ["--episodes", "3", "--samples", "8", "--horizon", "8", "--no-remember-blocked", "--no-keep-plan"]
    peira_path, lewm_path = tiny_two_rooms / "peira.pt", tiny_two_rooms / "lewm.pt"
    for name, models in (("both", f"{lewm_path},{peira_path}"), ("peira", str(peira_path)),
                         ("lewm", str(lewm_path))):
        plan.main(["--models", models, *flags, "--out", str(tmp_path / name)])
    capsys.readouterr()
    files = [str(tmp_path / name / "plan.json") for name in ("peira", "lewm")]
    merged = plan.summarise(files)
    both = json.loads((tmp_path / "both" / "plan.json").read_text())["rows"]
    def untimed(rows):
        return sorted(({k: v for k, v in r.items() if k != "plan_ms_per_step"} for r in rows),
                      key=lambda r: r["method"])

    assert untimed(merged) == untimed(both)
    older = json.loads((tmp_path / "lewm" / "plan.json").read_text())
    for flag in plan.BEFORE_FLAG:  # written before the flags existed: it ran without them
        del older["config"][flag]
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert untimed(plan.summarise([files[0], str(tmp_path / "older.json")])) == untimed(both)
    newer = json.loads((tmp_path / "lewm" / "plan.json").read_text())
    newer["config"]["remember_blocked"] = True  # planned with today's default: not like the older file
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(SystemExit, match="other settings"):
        plan.summarise([str(tmp_path / "older.json"), str(tmp_path / "newer.json")])
    changed = json.loads((tmp_path / "lewm" / "plan.json").read_text())
    changed["rows"][-1]["success"] = 0.123  # LeWM's row, planned again: the later file's is kept
    (tmp_path / "again.json").write_text(json.dumps(changed))
    rows = plan.main(["--summary", f"{files[1]},{tmp_path / 'again.json'}"])
    assert [r["success"] for r in rows if r["method"] == "lewm + planner"] == [0.123]
    changed["config"]["horizon"] = 16
    (tmp_path / "other.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="other settings"):
        plan.summarise([files[0], str(tmp_path / "other.json")])
    tuned = json.loads((tmp_path / "lewm" / "plan.json").read_text())
    tuned["config"]["margin_scale"] = 0.5  # tuned for each objective: its rows sit beside the others
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    capsys.readouterr()
    assert untimed(plan.summarise([files[0], str(tmp_path / "tuned.json")])) == untimed(both)
    assert f"{tmp_path / 'tuned.json'} (--margin-scale 0.5)" in capsys.readouterr().out


def test_two_rooms_seeds_share_a_folder_and_the_table_shows_each_objective(tiny_two_rooms, tmp_path, capsys):
    """--seed 1 writes peira-seed1.pt beside seed 0's peira.pt; the table's loss is each model's own
    objective (PEIRA's L_PEIRA, as logged, not its auxiliary loss)."""
    out = tmp_path / "two_rooms"
    out.mkdir()
    for source in tiny_two_rooms.iterdir():
        (out / source.name).write_bytes(source.read_bytes())
    before = (out / "peira.pt").read_bytes()
    tr.main(["--out", str(out), "--losses", "peira", "--seed", "1", "--steps", "2", "--trajectories", "16",
             "--length", "24", "--batch-size", "4", "--latent", "8"])
    assert (out / "peira-seed1.pt").exists() and (out / "peira.pt").read_bytes() == before
    assert set(plan.load_models(str(out))) == {"peira", "lewm", "peira-seed1"}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [h for h in logged if h["model"] == "peira-seed1"][-1]
    printed = capsys.readouterr().out
    assert "| model | final training loss (own objective) |" in printed
    assert f"| peira-seed1 | {last['objective']:.4f} |" in printed


def test_plan_refuses_foreign_damaged_stale_and_duplicate_checkpoints_in_one_line(tiny_two_rooms, tmp_path):
    good = tiny_two_rooms / "peira.pt"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")          # a pickled module: weights_only refuses it
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    stale = torch.load(good, weights_only=True)
    stale["config"].pop("render", None)                          # trained before the area-weighted walls
    torch.save(stale, tmp_path / "stale.pt")
    for name in ("junk.pt", "truncated.pt", "module.pt", "tensor.pt", "stale.pt"):
        with pytest.raises(SystemExit) as exc:
            plan.load_models(str(tmp_path / name))
        message = str(exc.value)
        assert message.startswith(str(tmp_path / name)) and "\n" not in message, name
        assert len(message) < len(str(tmp_path)) + 250, name
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "peira.pt").write_bytes(good.read_bytes())  # same label, another folder
    with pytest.raises(SystemExit, match="both labelled peira"):
        plan.load_models(f"{good},{tmp_path / 'copy' / 'peira.pt'}")


def test_plan_and_two_rooms_reject_nonsense_flags(tiny_two_rooms, tmp_path, capsys, monkeypatch):
    empty = str(tmp_path)  # never reached: the parser refuses first
    for bad in (["--horizon", "0"], ["--horizon", "-2"], ["--time-cost", "nan"], ["--time-cost", "inf"],
                ["--samples", "0"], ["--margin-scale", "-1"], ["--margin-scale", "nan"],
                ["--margin-scale", "2", "--no-keep-plan"]):
        with pytest.raises(SystemExit) as exc:
            plan.main(["--models", empty, *bad])
        assert exc.value.code == 2, bad  # a parser error
    with pytest.raises(SystemExit) as exc:
        tr.main(["--out", empty, "--horizon", "0", "--trajectories", "8", "--steps", "1"])
    assert exc.value.code == 2
    # --cost regressed: an error with no PEIRA model, a warning naming the models planned without P
    flags = ["--cost", "regressed", "--episodes", "1", "--samples", "4", "--horizon", "4", "--out", empty]
    with pytest.raises(SystemExit) as exc:
        plan.main(["--models", str(tiny_two_rooms / "lewm.pt"), *flags])
    assert exc.value.code == 2 and "needs a PEIRA model" in capsys.readouterr().err
    monkeypatch.setattr(tr, "MAX_STEPS", 5)
    monkeypatch.setattr(plan, "figure", lambda *args: None)
    monkeypatch.setattr(plan, "distance_maps", lambda *args: None)
    plan.main(["--models", f"{tiny_two_rooms / 'peira.pt'},{tiny_two_rooms / 'lewm.pt'}", *flags])
    assert "applies to PEIRA's models with pooled moments only; lewm planned" in capsys.readouterr().out


def test_plan_summarises_objectives_over_training_seeds(capsys):
    """plan.py groups model rows by objective over the training seeds named in their labels (no
    suffix: seed 0) and prints PEIRA's success minus each other objective's for each training seed
    that both objectives have, averaged, with its 95% t interval computed here directly (t_0.975, 2
    degrees of freedom: 4.302652729911275)."""
    rows = [{"method": m, "success": s} for m, s in [
        ("random", 0.01), ("true dynamics + planner, position cost", 1.0), ("peira + planner", 0.90),
        ("peira-seed1 + planner", 0.95), ("peira-seed2 + planner", 0.92), ("pldm + planner", 0.94),
        ("pldm-seed1 + planner", 0.93), ("pldm-seed2 + planner", 0.97), ("lewm-seed3 + planner", 0.9)]]
    groups = plan.by_objective(rows)
    assert groups == {"peira": {0: 0.90, 1: 0.95, 2: 0.92}, "pldm": {0: 0.94, 1: 0.93, 2: 0.97},
                      "lewm": {3: 0.9}}
    d = [-0.04, 0.02, -0.05]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    got, lo, hi = plan.paired_difference(groups["peira"], groups["pldm"])
    assert abs(got - mean) < 1e-12 and abs(hi - got - 4.302652729911275 * sd / math.sqrt(3)) < 1e-9
    assert math.isnan(plan.paired_difference(groups["peira"], groups["lewm"])[1])  # no shared seed
    plan.print_seed_summary(groups)
    out = capsys.readouterr().out
    assert "| peira | 0,1,2 | 92.3 ± 2.5% |" in out and f"| peira − pldm | {100 * mean:+.1f} [" in out
    plan.print_seed_summary({"peira": groups["peira"]})  # PEIRA alone: its summary, no empty pair table
    out = capsys.readouterr().out
    assert "| peira | 0,1,2 | 92.3 ± 2.5% |" in out and "paired difference" not in out

