"""The talk's theorems, verified numerically: SimSiam-like dynamics and PEIRA in function space.
The talk: M. Arbel, with B. Terver and J. Ponce, "Learning Predictive Embeddings through Inter-View
Regressor Alignment", CILVR seminar, NYU, 2026.

    python simsiam_dynamics.py                       # everything, about a minute on 2 CPU cores
    python simsiam_dynamics.py --only 2 --lam 0.02   # one section, another regularisation
    python simsiam_dynamics.py --n 12 --k 5 --seed 3 --starts 64

Sections (each a group of rows in the final table):
  1. Linear encoder, optimal predictor (Tang et al. 2023): orthogonality is conserved, the trace
     objective −½Tr((UΣyxUᵀ)²) decreases, limits span eigen-subspaces of Σyx.
  2. SimSiam-like dynamics in function space (V = U, optimal ridge predictor, gradient through the
     online branch) on discrete distributions, where an encoder is a table and the ODE is exact:
     convergence, the Lyapunov function F, amplitudes f(s, λ) of the limits, collapse frequency.
  3. PEIRA's gradient flow on the same kind of distributions: the global minimum from every start,
     amplitudes peira_filter(s, λ), no collapse; and minibatch gradients of the "direct" algorithm
     against the auxiliary loss with running moments (bias and variance).
  4. Neural networks on a Gaussian pair with correlation ρ (canonical functions: Hermite
     polynomials, s_i = ρ^i), trained by Adam with peira.PEIRALoss on samples.
  5. Along that training, the PEIRA objective against the alignment with the canonical subspace.

ODEs are integrated with an adaptive Dormand–Prince 5(4) scheme (rtol 1e-10) until the velocity
is below 1e-9. Writes results.json, table.txt and figures into --out.
"""
import argparse
import json
import math
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from tqdm import tqdm

import peira

# -----------------------------------------------------------------------------
# hyperparameters

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=8, help="number of values of x and y (tables)")
parser.add_argument("--k", type=int, default=4, help="embedding dimension")
parser.add_argument("--lam", type=float, default=0.04, help="regularisation λ (sections 1-3)")
parser.add_argument("--seed", type=int, default=0, help="seed of distributions and starts")
parser.add_argument("--starts", type=int, default=32, help="random initialisations per setting")
parser.add_argument("--only", type=int, choices=[1, 2, 3, 4, 5], help="run one section")
parser.add_argument("--out", default="out/simsiam_dynamics", help="output folder")

INIT_STD = 0.5                   # std of the random table entries at the start
LAM_GRID = (0.25, 0.5, 1, 2, 4)  # collapse fractions at these multiples of --lam
VEL_TOL = 1e-9                   # an ODE has converged when max ‖dU/dt‖ is below this
T_MAX = 2e4                      # ... or at this time
T_SHOW = 100.0                   # horizon of the runs that show what changes outside a theorem
RTOL, ATOL = 1e-10, 1e-12        # Dormand–Prince error tolerances
RHO = 0.8                        # correlation of the Gaussian pair (section 4)
NN_K, NN_LAM = 3, 0.3            # section 4's k and λ: the amplitudes' curvature is 4λ/√s, so a small
                                 # λ leaves them slow to settle; a small MLP picks up the cubic He_3
                                 # (a 4th direction) in some runs only, within a CPU minute
NN_STEPS, NN_BATCH, NN_LR = 2000, 1024, 3e-3  # Adam with a cosine schedule
GRAD_REPEATS = 1000              # minibatches per estimate of gradient bias and spread
BETA = 2.0                       # sharpness of p(x|z) in the latent-mixture distributions


# -----------------------------------------------------------------------------
# distributions and the integrator

def latent_mixture(n, seed, symmetric):
    """Joint table of two views drawn independently given a latent z (n classes):
    J = Σ_z π_z p(x|z) p(y|z)ᵀ. With one conditional for both views M is PSD (SimSiam's case)."""
    g = torch.Generator().manual_seed(seed)
    px_z = torch.softmax(BETA * torch.randn(n, n, generator=g), 1)
    py_z = px_z if symmetric else torch.softmax(BETA * torch.randn(n, n, generator=g), 1)
    pi = torch.softmax(torch.randn(n, generator=g), 0)
    J = px_z.T @ (pi[:, None] * py_z)
    return J / J.sum()


DOPRI_C = (0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1)
DOPRI_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
           (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DOPRI_B5 = DOPRI_A[6] + (0,)
DOPRI_B4 = (5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def integrate(field, y, monitor=None, t_max=T_MAX):
    """Dormand–Prince 5(4) for an autonomous ODE dy/dt = field(y) on a batch y (starts, ...),
    one step size for the batch, until every start's velocity is below VEL_TOL or t = t_max.
    monitor(y) is recorded at every accepted step. Returns (y, t, steps, records)."""
    t, h, steps = 0.0, 0.01, 0
    dy = field(y)
    records = [monitor(y)] if monitor else []
    while t < t_max and dy.flatten(1).norm(dim=1).max() > VEL_TOL:
        h = min(h, t_max - t)
        ks = [dy]
        for a in DOPRI_A[1:]:
            ks.append(field(y + h * sum(ai * ki for ai, ki in zip(a, ks) if ai)))
        y_new = y + h * sum(b * k for b, k in zip(DOPRI_B5, ks) if b)
        err = h * sum((b5 - b4) * k for b5, b4, k in zip(DOPRI_B5, DOPRI_B4, ks) if b5 != b4)
        scale = ATOL + RTOL * torch.maximum(y.abs(), y_new.abs())
        e = (err / scale).square().flatten(1).mean(1).sqrt().max().item()
        if e <= 1:
            t, y, dy, steps = t + h, y_new, ks[6], steps + 1  # first-same-as-last
            if monitor:
                records.append(monitor(y))
        h *= min(5.0, max(0.2, 0.9 * e ** -0.2)) if e > 0 else 5.0
    return y, t, steps, records


def random_tables(starts, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return INIT_STD * torch.randn(starts, n, k, generator=g)


def amplitudes(u_cca, p, U):
    """Coordinates C_ij = E[u_i(x) U_j(x)] of tables U (starts, n, k) on the canonical functions,
    and the amplitude of each canonical direction, ‖C_i‖."""
    C = u_cca.T @ (p[:, None] * U)
    return C, C.norm(dim=2)


def row(section, claim, theory, simulation, error, tol):
    """One table row; tol None marks a measurement reported without a pass/fail criterion."""
    return {"section": section, "claim": claim, "theory": theory, "simulation": simulation,
            "error": error, "tol": tol, "pass": None if tol is None else bool(error <= tol)}


# -----------------------------------------------------------------------------
# section 1: linear encoder, optimal predictor (Tang et al. 2023)

def linear_field(Sxx, Syx, lam):
    """dU/dt = −∂_U ½E‖PUx − sg(U)y‖² with P = UΣyxUᵀ(UΣxxUᵀ + λI)⁻¹, batched over starts."""
    def field(U):
        k = U.shape[1]
        P = torch.linalg.solve(U @ Sxx @ U.mT + lam * torch.eye(k), U @ Syx @ U.mT, left=False)
        return -P.mT @ (P @ U @ Sxx - U @ Syx)
    return field


def tang_objective(U, Syx):
    M = U @ Syx @ U.mT
    return -0.5 * (M @ M).diagonal(dim1=1, dim2=2).sum(1)


def section_linear(args):
    d, k, starts = args.n, min(args.k, args.n - 1), args.starts
    g = torch.Generator().manual_seed(args.seed + 1)
    A = torch.randn(d, d, generator=g)
    Syx = (A + A.T) / (2 * d ** 0.5)                           # symmetric cross-covariance
    U0 = torch.linalg.qr(torch.randn(starts, d, k, generator=g))[0].mT  # U0 U0ᵀ = I
    eye = torch.eye(k)

    def monitor(U):
        return ((U @ U.mT - eye).abs().flatten(1).max(1).values, tang_objective(U, Syx))

    U, t, steps, rec = integrate(linear_field(torch.eye(d), Syx, 0.0), U0, monitor)
    orth = torch.stack([r[0] for r in rec]).max().item()
    F = torch.stack([r[1] for r in rec])                       # (time, starts)
    rise = (F[1:] - F[:-1]).max().item()
    # the limit's row space is invariant under Σyx, i.e. spanned by k eigenvectors
    evals, evecs = torch.linalg.eigh(Syx)
    weight = (U @ evecs).square().sum(1)                       # energy of each eigenvector
    chosen = weight.topk(k, dim=1).indices
    E = evecs[:, chosen].permute(1, 0, 2)                      # (starts, d, k)
    angle = torch.linalg.svdvals(U.mT - E @ (E.mT @ U.mT)).max().asin().item()  # sin of the largest
    top = evals.abs().topk(k).indices.sort().values
    top_frac = (chosen.sort(1).values == top).all(1).double().mean().item()
    rows = [row(1, "orthogonal start: max |UUᵀ − I| over time", 0.0, orth, orth, 1e-6),
            row(1, "−½Tr((UΣyxUᵀ)²) never increases: max rise", 0.0, rise, max(rise, 0), 1e-12),
            row(1, "limit spans an eigen-subspace of Σyx: max principal angle", 0.0, angle, angle, 1e-6),
            row(1, f"starts whose limit is the top-{k} |eigenvalue| subspace", None, top_frac, None, None)]

    # what changes for general data (Σxx not ∝ I, Σyx not symmetric), a general start, and λ > 0
    B = torch.randn(d, d, generator=g)
    Sxx, Syx_gen = torch.eye(d) + 0.5 * B @ B.T / d, torch.randn(d, d, generator=g) / d ** 0.5
    U0g = (torch.eye(k) + 0.3 * torch.randn(starts, k, k, generator=g) / k ** 0.5) @ U0
    gram0 = U0g @ U0g.mT
    Ug, *_, rec_g = integrate(linear_field(Sxx, Syx_gen, 0.0), U0g,
                              lambda U: tang_objective(U, Syx_gen), t_max=T_SHOW)
    drift = (Ug @ Ug.mT - gram0).abs().max().item()
    F_g = torch.stack(rec_g)
    rows.append(row(1, f"general data and start, λ = 0: UUᵀ conserved up to t = {T_SHOW:g}",
                    0.0, drift, drift, 1e-6))
    rows.append(row(1, "general data: max rise of −½Tr((UΣyxUᵀ)²) (no longer monotone)", None,
                    (F_g[1:] - F_g[:-1]).max().item(), None, None))
    U_r, *_ = integrate(linear_field(torch.eye(d), Syx, args.lam), U0, t_max=T_SHOW)
    rows.append(row(1, f"ridge predictor λ = {args.lam}: max |UUᵀ − I| at t = {T_SHOW:g}", None,
                    (U_r @ U_r.mT - eye).abs().max().item(), None, None))
    return rows, {"steps": steps, "t_end": t, "orthogonality_error": orth, "max_F_rise": rise,
                  "max_principal_angle": angle, "top_subspace_fraction": top_frac,
                  "eigenvalues": evals.tolist()}, {}


# -----------------------------------------------------------------------------
# section 2: SimSiam-like dynamics in function space

def simsiam_field(J, lam):
    """dU/dt = −(Pᵀ(PU(x) − E[U(y)|x]) + λU(x)), P = E[U(y)U(x)ᵀ](E[UUᵀ] + λI)⁻¹: the L2(P_x)
    gradient of ½E‖PU(x) − sg(U(y))‖² + (λ/2)E‖U(x)‖² with the optimal predictor; lam may be a
    tensor (one λ per start)."""
    p, cond = J.sum(1), J / J.sum(1, keepdim=True)
    lam = torch.as_tensor(lam).reshape(-1, 1, 1)

    def field(U):
        C, A = U.mT @ (p[:, None] * U), U.mT @ J @ U
        P = torch.linalg.solve(C + lam * torch.eye(U.shape[2]), A, left=False)
        return -((U @ P.mT - cond @ U) @ P + lam * U)
    return field


def lyapunov(J, lam, U):
    """F(U) = −½Tr(E[U(x)U(y)ᵀ]²) + ⅓Tr((E[U(x)U(x)ᵀ] + λI)³)."""
    p = J.sum(1)
    A = U.mT @ J @ U
    C = U.mT @ (p[:, None] * U) + torch.as_tensor(lam).reshape(-1, 1, 1) * torch.eye(U.shape[2])
    return -0.5 * (A @ A).diagonal(dim1=1, dim2=2).sum(1) + (C @ C @ C).diagonal(dim1=1, dim2=2).sum(1) / 3


def selection(amp, tol=1e-4):
    """Selected canonical directions (amplitude above tol), r = their number, and whether they
    are the top r."""
    chosen = amp > tol
    r = chosen.sum(1)
    top = torch.arange(amp.shape[1])[None, :] < r[:, None]
    return chosen, r, (chosen == top).all(1)


def simsiam_collapse(J, s, k, lams, starts, seed):
    """Fraction of starts that collapse for each λ: r below the admissible count."""
    p = J.sum(1)
    _, u, _ = peira.nonlinear_cca(J)
    lam = torch.tensor(lams).repeat_interleave(starts)
    U, *_ = integrate(simsiam_field(J, lam), random_tables(len(lam), J.shape[0], k, seed))
    _, amp = amplitudes(u, p, U)
    _, r, _ = selection(amp)
    admissible = (peira.simsiam_filter(s[:k, None], torch.tensor(lams)) > 0).sum(0)
    return (r.view(len(lams), starts) < admissible[:, None]).double().mean(1).tolist()


def section_simsiam(args):
    J = latent_mixture(args.n, args.seed, symmetric=True)
    s, u, _ = peira.nonlinear_cca(J)
    p, k, lam = J.sum(1), args.k, args.lam
    f = peira.simsiam_filter(s, lam)
    U0 = random_tables(args.starts, args.n, k, args.seed + 2)
    U, t, steps, rec = integrate(simsiam_field(J, lam), U0, lambda U: lyapunov(J, lam, U))
    F = torch.stack(rec)
    vel = simsiam_field(J, lam)(U).flatten(1).norm(dim=1).max().item()
    rise = (F[1:] - F[:-1]).max().item()
    C, amp = amplitudes(u, p, U)
    chosen, r, is_top = selection(amp)
    amp_err = torch.where(chosen, (amp - f).abs(), amp).max().item()
    amp_err_sqrt2 = torch.where(chosen, (amp - f / 2 ** 0.5).abs(), amp).max().item()
    gram = C @ C.mT                                            # diag(a²) when q is orthonormal
    off = (gram - torch.diag_embed(gram.diagonal(dim1=1, dim2=2))).abs().max().item()
    resid = (U - u @ C).abs().max().item()                     # U lies in the canonical span
    P = torch.linalg.solve(U.mT @ (p[:, None] * U) + lam * torch.eye(k), U.mT @ J @ U, left=False)
    trace_sim = P.diagonal(dim1=1, dim2=2).sum(1)
    trace_th = (chosen * s * f ** 2 / (f ** 2 + lam)).sum(1)
    trace_err = (trace_sim - trace_th).abs().max().item()
    admissible = int((f[:k] > 0).sum())
    collapse = (r < admissible).double().mean().item()
    # collapse fraction against λ and k
    lams = [lam * c for c in LAM_GRID]
    grid = {kk: simsiam_collapse(J, s, kk, lams, args.starts, args.seed + 3) for kk in range(1, k + 1)}
    rows = [
        row(2, "converges: max ‖dU/dt‖ at the end", 0.0, vel, vel, 1e-8),
        row(2, "Lyapunov F never increases: max rise", 0.0, rise, max(rise, 0), 1e-10),
        row(2, "limits span canonical functions: max |U − Σ C_i u_i|", 0.0, resid, resid, 1e-8),
        row(2, "limits select the top r directions (fraction of starts)", 1.0,
            is_top.double().mean().item(), 1 - is_top.double().mean().item(), 0.0),
        row(2, "amplitudes = f(s,λ) = (s+√(s²−4λ))/2: max error", 0.0, amp_err, amp_err, 1e-6),
        row(2, "amplitudes = f(s,λ)/√2 (the talk's factor): max error", 0.0, amp_err_sqrt2, None, None),
        row(2, "q_i orthonormal: max off-diagonal of CCᵀ", 0.0, off, off, 1e-6),
        row(2, "Tr(P*) = Σ_{i≤r} s_i f²/(f²+λ): max error", 0.0, trace_err, trace_err, 1e-6),
        row(2, f"collapse fraction (k={k}, λ={lam:g}, {admissible} admissible)", None, collapse, None, None),
    ]
    out = {"s": s.tolist(), "f": f.tolist(), "lam": lam, "k": k, "steps": steps, "t_end": t,
           "amplitudes": amp.tolist(), "r": r.tolist(), "collapse_fraction": collapse,
           "amplitude_error": amp_err, "amplitude_error_if_sqrt2": amp_err_sqrt2,
           "lam_grid": lams, "collapse_vs_lam": {str(kk): v for kk, v in grid.items()},
           "normalisation": "f" if amp_err < amp_err_sqrt2 else "f/sqrt2"}
    return rows, out, {"F": F, "amp": amp, "s": s, "grid": grid, "lams": lams}


# -----------------------------------------------------------------------------
# section 3: PEIRA's gradient flow, and minibatch gradients

def peira_field(J, lam):
    """L2 gradient flow of L_PEIRA on tables: dU/dt = −(QSQU(x) − Q E[V(y)|x] + λU(x)), and the
    same for V with E[U(x)|y]; the state is U and V stacked along the table axis."""
    nx = J.shape[0]
    px, py = J.sum(1), J.sum(0)
    cond_x, cond_y = J / px[:, None], J.T / py[:, None]
    lam = torch.as_tensor(lam).reshape(-1, 1, 1)

    def field(UV):
        U, V = UV[:, :nx], UV[:, nx:]
        N = U.mT @ (px[:, None] * U) + V.mT @ (py[:, None] * V)
        E = U.mT @ J @ V
        S = E + E.mT
        Q = torch.cholesky_inverse(torch.linalg.cholesky(N + lam * torch.eye(U.shape[2])))
        QSQ = Q @ S @ Q
        dU = U @ QSQ - cond_x @ V @ Q + lam * U
        dV = V @ QSQ - cond_y @ U @ Q + lam * V
        return -torch.cat([dU, dV], 1)
    return field


def population_samples(J, U, V):
    """All pairs (x, y) weighted by sqrt(n J_xy): batch means of the (quadratic) moments and
    auxiliary loss over them are expectations under J."""
    nx, ny = J.shape
    w = (J.numel() * J).sqrt().reshape(-1, 1)
    return w * U.repeat_interleave(ny, 0), w * V.repeat(nx, 1)


def peira_population_objective(J, U, V, lam):
    return peira.peira_objective(*population_samples(J, U, V), lam)


def gradient_bias_variance(J, U, V, lam, batch, repeats, eta, seed):
    """Relative bias ‖E g − g*‖/‖g*‖ and spread sqrt(E‖g − E g‖²)/‖g*‖ of minibatch gradients on
    tables (U, V): the direct algorithm and the auxiliary loss with running moments. The squared
    bias is estimated without the Monte-Carlo noise of the mean, spread²/repeats."""
    U, V = U.clone().requires_grad_(), V.clone().requires_grad_()
    g_true = torch.cat([t.flatten() for t in torch.autograd.grad(peira_population_objective(J, U, V, lam), (U, V))])
    gen = torch.Generator().manual_seed(seed)
    ny = J.shape[1]

    def sample():
        idx = torch.multinomial(J.flatten(), batch, replacement=True, generator=gen)
        return U[idx // ny], V[idx % ny]

    loss_fn = peira.PEIRALoss(U.shape[1], lam=lam, eta=eta).double()
    with torch.no_grad():
        for _ in range(20):  # warm the running moments up at these encoders
            loss_fn(*sample())
    grads = {"direct": [], "running": []}
    for _ in range(repeats):
        for name, loss in (("direct", peira.peira_objective(*sample(), lam)), ("running", loss_fn(*sample()))):
            grads[name].append(torch.cat([t.flatten() for t in torch.autograd.grad(loss, (U, V))]))
    out = {}
    for name, gs in grads.items():
        gs = torch.stack(gs)
        mean = gs.mean(0)
        spread2 = (gs - mean).square().sum(1).sum() / (repeats - 1)
        bias2 = ((mean - g_true).square().sum() - spread2 / repeats).clamp_min(0)
        out[name] = (bias2.sqrt() / g_true.norm()).item(), (spread2.sqrt() / g_true.norm()).item()
    return out


def section_peira(args):
    J = latent_mixture(args.n, args.seed + 10, symmetric=False)
    s, u, v = peira.nonlinear_cca(J)
    px, py, k, lam, n = J.sum(1), J.sum(0), args.k, args.lam, args.n
    a = peira.peira_filter(s[:k], lam)
    L_star = -((s[:k].sqrt() - lam).clamp_min(0).square()).sum().item() / 2
    UV0 = torch.cat([random_tables(args.starts, n, k, args.seed + 4),
                     random_tables(args.starts, n, k, args.seed + 5)], 1)
    # the closed-form field is the (negated) gradient of peira.aux_loss on population samples
    U0, V0 = UV0[0, :n].clone().requires_grad_(), UV0[0, n:].clone().requires_grad_()
    N, S = peira.moments(*population_samples(J, U0.detach(), V0.detach()))
    P, Q = peira.optimal_regressor(N, S, lam)
    gU, gV = torch.autograd.grad(peira.aux_loss(*population_samples(J, U0, V0), P, Q, lam), (U0, V0))
    field_err = (peira_field(J, lam)(UV0[:1])[0] + torch.cat([gU / px[:, None], gV / py[:, None]])).abs().max().item()

    def objective(UV):  # −½Tr(S(N + λI)⁻¹) + (λ/2)Tr(N), batched over starts
        U, V = UV[:, :n], UV[:, n:]
        N = U.mT @ (px[:, None] * U) + V.mT @ (py[:, None] * V)
        E = U.mT @ J @ V
        SQ = torch.linalg.solve(N + lam * torch.eye(k), E + E.mT, left=False)
        return -0.5 * SQ.diagonal(dim1=1, dim2=2).sum(1) + 0.5 * lam * N.diagonal(dim1=1, dim2=2).sum(1)

    UV, t, steps, rec = integrate(peira_field(J, lam), UV0, objective)
    L_traj = torch.stack(rec)
    L_end = torch.stack([peira_population_objective(J, w[:n], w[n:], lam) for w in UV])  # with peira
    gap = (L_end - L_star).abs().max().item()
    rise = (L_traj[1:] - L_traj[:-1]).max().item()
    C, amp = amplitudes(u, px, UV[:, :n])
    D, _ = amplitudes(v, py, UV[:, n:])
    amp_err = (amp[:, :k] - a).abs().max().item()
    rest = amp[:, k:].max().item() if amp.shape[1] > k else 0.0
    same_q = (C - D).abs().max().item()
    # collapse: none over the λ grid and k
    lams = [lam * c for c in LAM_GRID]
    collapse = {}
    for kk in range(1, k + 1):
        lam_t = torch.tensor(lams).repeat_interleave(args.starts)
        UV0k = torch.cat([random_tables(len(lam_t), n, kk, args.seed + 6),
                          random_tables(len(lam_t), n, kk, args.seed + 7)], 1)
        UVk, *_ = integrate(peira_field(J, lam_t), UV0k)
        _, amp_k = amplitudes(u, px, UVk[:, :n])
        expect = peira.peira_filter(s[:kk, None], lam_t[None, :]).T
        collapse[kk] = ((amp_k[:, :kk] - expect).abs().max(1).values > 1e-4).view(len(lams), -1).double().mean(1).tolist()
    worst = max(max(v) for v in collapse.values())
    # minibatch gradients at a random point: direct vs running moments
    bv = {b: gradient_bias_variance(J, UV0[0, :n], UV0[0, n:], lam, b, GRAD_REPEATS, 0.1, args.seed)
          for b in (16, 64, 256)}
    rows = [
        row(3, "closed-form flow = −gradient of peira.aux_loss: max error", 0.0, field_err, field_err, 1e-12),
        row(3, "objective never increases along the flow: max rise", 0.0, rise, max(rise, 0), 1e-10),
        row(3, "every start reaches −Σ max(√s_i − λ, 0)²/2", L_star, L_end.max().item(), gap, 1e-8),
        row(3, "amplitudes = peira_filter(s, λ): max error", 0.0, amp_err, amp_err, 1e-6),
        row(3, "no energy beyond the top k canonical functions", 0.0, rest, rest, 1e-6),
        row(3, "U and V share q_i and amplitudes: max |C_U − C_V|", 0.0, same_q, same_q, 1e-6),
        row(3, f"collapse fraction, worst over k ≤ {k} and λ grid", 0.0, worst, worst, 0.0),
    ]
    for b, res in bv.items():
        rows.append(row(3, f"batch {b}: gradient bias, direct vs running moments (η 0.1)",
                        res["direct"][0], res["running"][0], None, None))
        rows.append(row(3, f"batch {b}: gradient spread, direct vs running moments",
                        res["direct"][1], res["running"][1], None, None))
    out = {"s": s.tolist(), "a": a.tolist(), "lam": lam, "k": k, "L_star": L_star,
           "L_end": L_end.tolist(), "amplitudes": amp.tolist(), "steps": steps, "t_end": t,
           "lam_grid": lams, "collapse_vs_lam": {str(kk): v for kk, v in collapse.items()},
           "gradient_bias_spread": {str(b): r for b, r in bv.items()}}
    return rows, out, {"L": L_traj, "L_star": L_star, "amp": amp, "s": s}


# -----------------------------------------------------------------------------
# sections 4 and 5: neural networks on a Gaussian pair

def hermite(x, m):
    """Orthonormal (probabilists') Hermite polynomials He_i(x)/√i!, i < m: the canonical
    functions of a standard Gaussian pair with correlation ρ, with s_i = ρ^i."""
    H = [torch.ones_like(x), x]
    for i in range(1, m - 1):
        H.append(x * H[i] - i * H[i - 1])
    return torch.stack([H[i] / math.sqrt(math.factorial(i)) for i in range(m)], -1)


def gaussian_pair(batch, gen):
    x = torch.randn(batch, generator=gen)
    return x, RHO * x + math.sqrt(1 - RHO ** 2) * torch.randn(batch, generator=gen)


def mlp(k):
    return nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, k)).float()


def subspace_alignment(E, H):
    """Mean cos² of the principal angles between the spans of the columns of E and of H
    (samples in rows; in L2 of the sampling distribution)."""
    qe, qh = torch.linalg.qr(E)[0], torch.linalg.qr(H)[0]
    return torch.linalg.svdvals(qe.T @ qh).square().mean().item()


def section_networks(args):
    torch.manual_seed(args.seed)
    k, lam, m = NN_K, NN_LAM, NN_K + 4
    gen = torch.Generator().manual_seed(args.seed + 20)
    x_test, y_test = gaussian_pair(50_000, gen)
    Hx, Hy = hermite(x_test, m), hermite(y_test, m)
    s = RHO ** torch.arange(m, dtype=torch.float64)
    a = peira.peira_filter(s[:k], lam)
    L_star = -((s[:k].sqrt() - lam).clamp_min(0).square()).sum().item() / 2
    U, V = mlp(k), mlp(k)  # float32 networks, as in practice; evaluation in float64
    opt = torch.optim.Adam([*U.parameters(), *V.parameters()], lr=NN_LR)
    loss_fn = peira.PEIRALoss(k, lam=lam).float()

    def embed(x, y):
        return U(x[:, None].float()), V(y[:, None].float())

    trace, checkpoints = [], {int(2 ** (i / 2)) for i in range(2 * int(math.log2(NN_STEPS)) + 1)} | {0, NN_STEPS}
    for step in tqdm(range(NN_STEPS + 1), desc="section 4: MLPs on a Gaussian pair", leave=False):
        frac = step / NN_STEPS
        if step in checkpoints:  # log-spaced: the representation forms in the first hundred steps
            with torch.no_grad():
                ux, vy = (e.double() for e in embed(x_test, y_test))
            trace.append({"step": step, "objective": peira.peira_objective(ux, vy, lam).item(),
                          "alignment": (subspace_alignment(ux, Hx[:, :k]) + subspace_alignment(vy, Hy[:, :k])) / 2})
        if step == NN_STEPS:
            break
        for group in opt.param_groups:
            group["lr"] = NN_LR * 0.5 * (1 + math.cos(math.pi * frac))
        loss_fn.eta = 0.5 - 0.4 * frac  # running-moment weight annealed 0.5 → 0.1
        loss = loss_fn(*embed(*gaussian_pair(NN_BATCH, gen)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    C = Hx.T @ ux / len(x_test)                                 # E[h_i(x) U(x)]
    amp = C.norm(dim=1)
    amp_err = (amp[:k] - a).abs().max().item()
    beyond = amp[k:].max().item()
    s_lin, _, _ = peira.linear_cca(ux, vy)
    corr_err = (s_lin[:k - 1] - s[1:k]).abs().max().item()
    L_end = trace[-1]["objective"]
    obj = torch.tensor([r["objective"] for r in trace])
    ali = torch.tensor([r["alignment"] for r in trace])
    spearman = torch.corrcoef(torch.stack([obj.argsort().argsort(), ali.argsort().argsort()]).double())[0, 1].item()
    rows = [
        row(4, f"MLPs (k={k}, λ={lam}, {NN_STEPS} Adam steps): objective reaches −Σ(√ρ^i − λ)²/2", L_star, L_end,
            abs(L_end - L_star), 0.01 * abs(L_star)),
        row(4, "amplitudes on Hermite functions = peira_filter(ρ^i, λ): max error", 0.0, amp_err, amp_err, 0.05),
        row(4, f"no energy on Hermite functions {k}..{m - 1}: max amplitude", 0.0, beyond, beyond, 0.05),
        row(4, "canonical correlations of the embeddings = ρ^i, 1 ≤ i < k: max error", 0.0, corr_err, corr_err, 0.02),
        row(5, "objective tracks alignment with the canonical subspace (Spearman)", -1.0, spearman,
            spearman + 1, 0.2),
        row(5, "alignment with span{He_0..He_k-1} at the end", 1.0, ali[-1].item(), 1 - ali[-1].item(), 0.02),
    ]
    out = {"rho": RHO, "s": s.tolist(), "a": a.tolist(), "amplitudes": amp.tolist(),
           "canonical_correlations": s_lin.tolist(), "L_star": L_star, "L_end": L_end,
           "trace": trace, "spearman": spearman}
    return rows, out, {"trace": trace, "amp": amp, "s": s}


# -----------------------------------------------------------------------------
# figures, table, main

def figures(plots, lam, out):
    if 2 in plots:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        F = plots[2]["F"]
        ax.plot(F[:, :8] - F[-1, :8])
        ax.set(yscale="log", xlabel="accepted ODE step", ylabel="F(U_t) − F(U_∞)",
               title="SimSiam-like flow: the Lyapunov function decreases")
        fig.tight_layout(); fig.savefig(os.path.join(out, "lyapunov.png"), dpi=120); plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for kk, fr in plots[2]["grid"].items():
            ax.plot(plots[2]["lams"], fr, "o-", label=f"SimSiam-like, k={kk}")
        if 3 in plots:
            ax.plot(plots[2]["lams"], [0] * len(plots[2]["lams"]), "k--", label="PEIRA, every k")
        ax.set(xscale="log", xlabel="λ", ylabel="fraction of starts that collapse", ylim=(-0.05, 1.05))
        ax.legend(fontsize=8); fig.tight_layout()
        fig.savefig(os.path.join(out, "collapse.png"), dpi=120); plt.close(fig)
    if 2 in plots or 3 in plots or 4 in plots:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        grid = torch.linspace(0, 1, 400)
        ax.plot(grid, peira.simsiam_filter(grid, lam), "C0", label="f(s, λ) SimSiam-like")
        ax.plot(grid, peira.peira_filter(grid, lam), "C1", label="peira_filter(s, λ)")
        if 2 in plots:
            s, amp = plots[2]["s"], plots[2]["amp"]
            ax.plot(s.expand_as(amp).flatten(), amp.flatten(), "C0o", ms=4, mfc="none", label="SimSiam limits (tables)")
        if 3 in plots:
            s, amp = plots[3]["s"], plots[3]["amp"]
            ax.plot(s.expand_as(amp).flatten(), amp.flatten(), "C1x", ms=5, label="PEIRA limits (tables)")
        if 4 in plots:
            ax.plot(grid, peira.peira_filter(grid, NN_LAM), "C3--", lw=1, label=f"peira_filter(s, {NN_LAM})")
            ax.plot(plots[4]["s"], plots[4]["amp"], "C3s", ms=5, mfc="none", label=f"PEIRA MLPs, λ = {NN_LAM}")
        ax.set(xlabel="canonical correlation s", ylabel="amplitude", title=f"limits against the filters, λ = {lam:g}")
        ax.legend(fontsize=8); fig.tight_layout()
        fig.savefig(os.path.join(out, "amplitudes.png"), dpi=120); plt.close(fig)
    if 4 in plots:
        trace = plots[4]["trace"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        sc = ax.scatter([r["alignment"] for r in trace], [r["objective"] for r in trace],
                        c=[r["step"] for r in trace], cmap="viridis")
        fig.colorbar(sc, label="step")
        ax.set(xlabel="alignment with the canonical subspace", ylabel="PEIRA objective (held out)",
               title="the objective tracks representation quality")
        fig.tight_layout(); fig.savefig(os.path.join(out, "objective_vs_alignment.png"), dpi=120); plt.close(fig)


def format_table(rows):
    def num(x):
        return "—" if x is None else f"{x:.3g}"
    lines = [f"{'§':<2} {'claim':<74} {'theory':>10} {'simulation':>11} {'error':>9}  result"]
    for r in rows:
        verdict = "info" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
        lines.append(f"{r['section']:<2} {r['claim']:<74} {num(r['theory']):>10} "
                     f"{num(r['simulation']):>11} {num(r['error']):>9}  {verdict}")
    return "\n".join(lines)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.n < 3 or args.k < 1 or args.k >= args.n or args.starts < 1:
        parser.error("need n ≥ 3, 1 ≤ k < n, starts ≥ 1")
    if not args.lam > 0:
        parser.error(f"--lam must be > 0, got {args.lam}")
    os.makedirs(args.out, exist_ok=True)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)  # theory checks to 1e-8 and below need float64
    torch.set_num_threads(1)  # the matrices are tiny: threads only add synchronisation
    try:
        return run(args)
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def run(args):
    sections = {1: section_linear, 2: section_simsiam, 3: section_peira, 4: section_networks}
    chosen = [args.only] if args.only else [1, 2, 3, 4]
    if args.only == 5:
        chosen = [4]  # section 5 is measured along section 4's training
    rows, results, plots = [], {"config": vars(args)}, {}
    for sec in chosen:
        t0 = time.time()
        r, res, plot = sections[sec](args)
        rows += r
        results[f"section{sec}"] = {**res, "seconds": time.time() - t0, "rows": r}
        plots[sec] = plot
        print(f"section {sec} done in {time.time() - t0:.1f} s", flush=True)
    figures(plots, args.lam, args.out)
    table = format_table(rows)
    print(table)
    failed = sum(r["pass"] is False for r in rows)
    print(f"{sum(r['pass'] is True for r in rows)} passed, {failed} failed")
    results["all_passed"] = failed == 0
    with open(os.path.join(args.out, "table.txt"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    raise SystemExit(0 if main()["all_passed"] else 1)
