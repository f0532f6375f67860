"""The talk's theorems, verified numerically: SimSiam-like dynamics and PEIRA in function space.
The talk: M. Arbel, with B. Terver and J. Ponce, "Learning Predictive Embeddings through Inter-View
Regressor Alignment", CILVR seminar, NYU, 21 April 2026.

    python simsiam_dynamics.py --only 4 5            # two MLPs find the Hermite functions, ~30 s
    python simsiam_dynamics.py                       # everything, about a minute on 2 CPU cores
    python simsiam_dynamics.py --only 2 --lam 0.02   # one section, another regularisation
    python simsiam_dynamics.py --n 12 --k 5 --seed 3 --starts 64

Sections (each a group of rows in the final table):
  1. Linear encoder, optimal predictor (Y. Tang et al., "Understanding Self-Predictive Learning for
     Reinforcement Learning", ICML 2023): orthogonality is conserved, the trace objective
     −½Tr((UΣyxUᵀ)²) decreases, limits span eigen-subspaces of Σyx.
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
is below 1e-9. Writes results.json, table.txt and the figures lyapunov.png (section 2),
collapse.png (2, 3), amplitudes.png (2, 3, 4) and objective_vs_alignment.png (5) into --out.
"""
import argparse
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from tqdm import tqdm

import peira

# -----------------------------------------------------------------------------
# settings

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--n", type=int, default=8, help="number of values of x and y (tables)")
parser.add_argument("--k", type=int, default=4, help="embedding dimension")
parser.add_argument("--lam", type=float, default=0.04, help="regularisation λ (sections 1-3)")
parser.add_argument("--seed", type=int, default=0, help="seed of distributions and starts")
parser.add_argument("--starts", type=int, default=32, help="random initialisations per setting")
parser.add_argument("--only", type=int, nargs="+", choices=[1, 2, 3, 4, 5], metavar="SECTION",
                    help="run these sections only (1 to 5; 4 and 5 share one training run)")
parser.add_argument("--out", default="out/simsiam_dynamics", help="output folder")

INIT_STD = 0.5                   # std of the random table entries at the start
LAM_GRID = (0.25, 0.5, 1, 2, 4)  # collapse fractions at these multiples of --lam
VEL_TOL = 1e-9                   # an ODE has converged when max ‖dU/dt‖ is below this
T_MAX = 2e4                      # ... or at this time
T_SHOW = 100.0                   # horizon of the runs that show what changes outside a theorem
RTOL, ATOL = 1e-10, 1e-12        # Dormand–Prince error tolerances
RHO = 0.8                        # correlation of the Gaussian pair (sections 4, 5)
NN_K, NN_LAM = 3, 0.3            # section 4's k and λ: the amplitudes' curvature is 4λ/√s, so a small
                                 # λ leaves them slow to settle; a small MLP picks up the cubic He_3
                                 # (a 4th direction) in some runs only, within a CPU minute
NN_STEPS, NN_BATCH, NN_LR = 2000, 1024, 3e-3  # Adam with a cosine schedule
GRAD_REPEATS = 1000              # minibatches per estimate of gradient bias and spread
BETA = 2.0                       # sharpness of p(x|z) in the latent-mixture distributions


# -----------------------------------------------------------------------------
# what every section returns: rows of the final table, results, figures

@dataclass
class Row:
    """One line of the final table: a claim, the value the theory gives, the value simulated, and
    the largest error that passes. A row without a tolerance is a measurement reported without a
    pass/fail criterion ("info"). The error is |simulation − theory| unless given explicitly (for
    one-sided claims such as "never increases")."""
    claim: str
    theory: Optional[float]
    simulation: float
    tolerance: Optional[float] = None
    error: Optional[float] = None

    def __post_init__(self):
        if self.error is None and self.tolerance is not None:
            self.error = abs(self.simulation - self.theory)

    @property
    def passed(self):
        """True or False; None for an info row."""
        if self.tolerance is None:
            return None
        return bool(self.error <= self.tolerance)

    def verdict(self):
        if self.passed is None:
            return "info"
        return "pass" if self.passed else "FAIL"

    def as_json(self, section):
        return {"section": section, "claim": self.claim, "theory": self.theory,
                "simulation": self.simulation, "error": self.error, "tol": self.tolerance,
                "pass": self.passed}


def never_increases(quantity, rise, tolerance, where=""):
    """The row of a one-sided claim: the largest rise of a quantity along a flow is its error (a
    fall is no error)."""
    return Row(f"{quantity} never increases{where}: max rise", theory=0.0, simulation=rise,
               tolerance=tolerance, error=max(rise, 0))


@dataclass
class Section:
    """What a section returns: its rows of the table, and its results for results.json."""
    rows: list
    results: dict


class Figures:
    """The run's figures by file name. A figure that several sections draw on is made by the first
    of them; legends are added and the files written once every section has drawn."""

    def __init__(self):
        self.axes = {}

    def get(self, name, make_axes):
        """The axes of figure `name`, made by make_axes() on first use."""
        if name not in self.axes:
            self.axes[name] = make_axes()
        return self.axes[name]

    def save(self, folder):
        for name, ax in self.axes.items():
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.figure.tight_layout()
            ax.figure.savefig(os.path.join(folder, name), dpi=120)
            plt.close(ax.figure)


def new_axes(size, **settings):
    """The axes of a new figure, with labels, scales and limits given as ax.set keywords."""
    _, ax = plt.subplots(figsize=size)
    ax.set(**settings)
    return ax


def collapse_axes(figures):
    """collapse.png, shared by sections 2 and 3: fraction of starts that collapse against λ."""
    return figures.get("collapse.png", lambda: new_axes(
        (5, 3.5), xscale="log", xlabel="λ", ylabel="fraction of starts that collapse",
        ylim=(-0.05, 1.05)))


def amplitude_axes(figures, lam):
    """amplitudes.png, shared by sections 2, 3 and 4: amplitudes of the limits on the canonical
    functions against the SimSiam-like and PEIRA filters at λ = lam."""
    def make():
        ax = new_axes((5.5, 3.8), xlabel="canonical correlation s", ylabel="amplitude",
                      title=f"limits against the filters, λ = {lam:g}")
        s = torch.linspace(0, 1, 400)
        ax.plot(s, peira.simsiam_filter(s, lam), "C0", label="f(s, λ) SimSiam-like")
        ax.plot(s, peira.peira_filter(s, lam), "C1", label="peira_filter(s, λ)")
        return ax
    return figures.get("amplitudes.png", make)


# -----------------------------------------------------------------------------
# distributions and the integrator, shared by sections 1 to 3

def latent_mixture(n, seed, symmetric):
    """Joint table of two views drawn independently given a latent z (n classes):
    J = Σ_z π_z p(x|z) p(y|z)ᵀ. With one conditional for both views M is PSD (SimSiam's case)."""
    gen = torch.Generator().manual_seed(seed)
    px_z = torch.softmax(BETA * torch.randn(n, n, generator=gen), 1)
    if symmetric:
        py_z = px_z
    else:
        py_z = torch.softmax(BETA * torch.randn(n, n, generator=gen), 1)
    pi = torch.softmax(torch.randn(n, generator=gen), 0)
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
        error_ratio = (err / scale).square().flatten(1).mean(1).sqrt().max().item()
        if error_ratio <= 1:
            t, y, dy, steps = t + h, y_new, ks[6], steps + 1  # first-same-as-last
            if monitor:
                records.append(monitor(y))
        # the usual step-size controller for a 5th-order error, kept within a factor 0.2 to 5
        if error_ratio > 0:
            h *= min(5.0, max(0.2, 0.9 * error_ratio ** -0.2))
        else:
            h *= 5.0
    return y, t, steps, records


def random_tables(starts, n, k, seed):
    """Random starting encoders: `starts` tables of n values in dimension k."""
    gen = torch.Generator().manual_seed(seed)
    return INIT_STD * torch.randn(starts, n, k, generator=gen)


def amplitudes(u_cca, p, U):
    """Coordinates C_ij = E[u_i(x) U_j(x)] of tables U (starts, n, k) on the canonical functions,
    and the amplitude of each canonical direction, ‖C_i‖."""
    C = u_cca.T @ (p[:, None] * U)
    return C, C.norm(dim=2)


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
    """−½Tr((UΣyxUᵀ)²), batched over starts."""
    M = U @ Syx @ U.mT
    return -0.5 * (M @ M).diagonal(dim1=1, dim2=2).sum(1)


def section_linear(args, figures):
    d, k, starts = args.n, min(args.k, args.n - 1), args.starts
    gen = torch.Generator().manual_seed(args.seed + 1)
    A = torch.randn(d, d, generator=gen)
    Syx = (A + A.T) / (2 * d ** 0.5)                           # symmetric cross-covariance
    U0 = torch.linalg.qr(torch.randn(starts, d, k, generator=gen))[0].mT  # U0 U0ᵀ = I
    eye = torch.eye(k)

    def monitor(U):
        return ((U @ U.mT - eye).abs().flatten(1).max(1).values, tang_objective(U, Syx))

    U, t, steps, records = integrate(linear_field(torch.eye(d), Syx, 0.0), U0, monitor)
    orth = torch.stack([r[0] for r in records]).max().item()
    objective = torch.stack([r[1] for r in records])           # (time, starts)
    rise = (objective[1:] - objective[:-1]).max().item()
    # the limit's row space is invariant under Σyx, i.e. spanned by k eigenvectors
    evals, evecs = torch.linalg.eigh(Syx)
    weight = (U @ evecs).square().sum(1)                       # energy of each eigenvector
    chosen = weight.topk(k, dim=1).indices
    E = evecs[:, chosen].permute(1, 0, 2)                      # (starts, d, k)
    # sine of the largest principal angle between the limit's rows and the chosen eigenvectors
    angle = torch.linalg.svdvals(U.mT - E @ (E.mT @ U.mT)).max().asin().item()
    top = evals.abs().topk(k).indices.sort().values
    top_frac = (chosen.sort(1).values == top).all(1).double().mean().item()
    rows = [
        Row("orthogonal start: max |UUᵀ − I| over time", theory=0.0, simulation=orth, tolerance=1e-6),
        never_increases("−½Tr((UΣyxUᵀ)²)", rise, tolerance=1e-12),
        Row("limit spans an eigen-subspace of Σyx: max principal angle", theory=0.0, simulation=angle,
            tolerance=1e-6),
        Row(f"starts whose limit is the top-{k} |eigenvalue| subspace", theory=None, simulation=top_frac),
    ]

    # what changes for general data (Σxx not ∝ I, Σyx not symmetric), a general start, and λ > 0
    B = torch.randn(d, d, generator=gen)
    Sxx, Syx_general = torch.eye(d) + 0.5 * B @ B.T / d, torch.randn(d, d, generator=gen) / d ** 0.5
    U0_general = (torch.eye(k) + 0.3 * torch.randn(starts, k, k, generator=gen) / k ** 0.5) @ U0
    gram0 = U0_general @ U0_general.mT
    U_general, *_, records_general = integrate(linear_field(Sxx, Syx_general, 0.0), U0_general,
                                               lambda U: tang_objective(U, Syx_general), t_max=T_SHOW)
    drift = (U_general @ U_general.mT - gram0).abs().max().item()
    objective_general = torch.stack(records_general)
    rows.append(Row(f"general data and start, λ = 0: UUᵀ conserved up to t = {T_SHOW:g}",
                    theory=0.0, simulation=drift, tolerance=1e-6))
    rows.append(Row("general data: max rise of −½Tr((UΣyxUᵀ)²) (no longer monotone)", theory=None,
                    simulation=(objective_general[1:] - objective_general[:-1]).max().item()))
    U_ridge, *_ = integrate(linear_field(torch.eye(d), Syx, args.lam), U0, t_max=T_SHOW)
    rows.append(Row(f"ridge predictor λ = {args.lam}: max |UUᵀ − I| at t = {T_SHOW:g}", theory=None,
                    simulation=(U_ridge @ U_ridge.mT - eye).abs().max().item()))
    return Section(rows, {"steps": steps, "t_end": t, "orthogonality_error": orth, "max_F_rise": rise,
                          "max_principal_angle": angle, "top_subspace_fraction": top_frac,
                          "eigenvalues": evals.tolist()})


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
    return (-0.5 * (A @ A).diagonal(dim1=1, dim2=2).sum(1)
            + (C @ C @ C).diagonal(dim1=1, dim2=2).sum(1) / 3)


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


def section_simsiam(args, figures):
    J = latent_mixture(args.n, args.seed, symmetric=True)
    s, u, _ = peira.nonlinear_cca(J)
    p, k, lam = J.sum(1), args.k, args.lam
    f = peira.simsiam_filter(s, lam)
    U0 = random_tables(args.starts, args.n, k, args.seed + 2)
    U, t, steps, records = integrate(simsiam_field(J, lam), U0, lambda U: lyapunov(J, lam, U))
    F = torch.stack(records)                                   # (time, starts)
    vel = simsiam_field(J, lam)(U).flatten(1).norm(dim=1).max().item()
    rise = (F[1:] - F[:-1]).max().item()
    C, amp = amplitudes(u, p, U)
    chosen, r, is_top = selection(amp)
    top_frac = is_top.double().mean().item()
    amp_err = torch.where(chosen, (amp - f).abs(), amp).max().item()
    amp_err_sqrt2 = torch.where(chosen, (amp - f / 2 ** 0.5).abs(), amp).max().item()
    gram = C @ C.mT                                            # diag(a²) when q is orthonormal
    off_diagonal = (gram - torch.diag_embed(gram.diagonal(dim1=1, dim2=2))).abs().max().item()
    resid = (U - u @ C).abs().max().item()                     # U lies in the canonical span
    P = torch.linalg.solve(U.mT @ (p[:, None] * U) + lam * torch.eye(k), U.mT @ J @ U, left=False)
    trace_sim = P.diagonal(dim1=1, dim2=2).sum(1)
    trace_th = (chosen * s * f ** 2 / (f ** 2 + lam)).sum(1)
    trace_err = (trace_sim - trace_th).abs().max().item()
    admissible = int((f[:k] > 0).sum())
    collapse = (r < admissible).double().mean().item()
    lams = [lam * c for c in LAM_GRID]
    collapse_by_k = {k_small: simsiam_collapse(J, s, k_small, lams, args.starts, args.seed + 3)
                     for k_small in range(1, k + 1)}
    rows = [
        Row("converges: max ‖dU/dt‖ at the end", theory=0.0, simulation=vel, tolerance=1e-8),
        never_increases("Lyapunov F", rise, tolerance=1e-10),
        Row("limits span canonical functions: max |U − Σ C_i u_i|", theory=0.0, simulation=resid,
            tolerance=1e-8),
        Row("limits select the top r directions (fraction of starts)", theory=1.0, simulation=top_frac,
            tolerance=0.0),
        Row("amplitudes = f(s,λ) = (s+√(s²−4λ))/2: max error", theory=0.0, simulation=amp_err,
            tolerance=1e-6),
        Row("amplitudes = f(s,λ)/√2 (the talk's factor): max error", theory=0.0,
            simulation=amp_err_sqrt2),
        Row("q_i orthonormal: max off-diagonal of CCᵀ", theory=0.0, simulation=off_diagonal,
            tolerance=1e-6),
        Row("Tr(P*) = Σ_{i≤r} s_i f²/(f²+λ): max error", theory=0.0, simulation=trace_err,
            tolerance=1e-6),
        Row(f"collapse fraction (k={k}, λ={lam:g}, {admissible} admissible)", theory=None,
            simulation=collapse),
    ]

    ax = figures.get("lyapunov.png", lambda: new_axes(
        (5, 3.5), yscale="log", xlabel="accepted ODE step", ylabel="F(U_t) − F(U_∞)",
        title="SimSiam-like flow: the Lyapunov function decreases"))
    ax.plot(F[:, :8] - F[-1, :8])                              # 8 starts: more would be a blur
    ax = collapse_axes(figures)
    for k_small, fractions in collapse_by_k.items():
        ax.plot(lams, fractions, "o-", label=f"SimSiam-like, k={k_small}")
    amplitude_axes(figures, lam).plot(s.expand_as(amp).flatten(), amp.flatten(), "C0o", ms=4,
                                      mfc="none", label="SimSiam limits (tables)")

    return Section(rows, {
        "s": s.tolist(), "f": f.tolist(), "lam": lam, "k": k, "steps": steps, "t_end": t,
        "amplitudes": amp.tolist(), "r": r.tolist(), "collapse_fraction": collapse,
        "amplitude_error": amp_err, "amplitude_error_if_sqrt2": amp_err_sqrt2,
        "lam_grid": lams, "collapse_vs_lam": {str(k_small): v for k_small, v in collapse_by_k.items()},
        "normalisation": "f" if amp_err < amp_err_sqrt2 else "f/sqrt2"})


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


def flat_gradient(loss, tensors):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, tensors)])


def gradient_bias_variance(J, U, V, lam, batch, repeats, eta, seed):
    """Relative bias ‖E g − g*‖/‖g*‖ and spread sqrt(E‖g − E g‖²)/‖g*‖ of minibatch gradients on
    tables (U, V): the direct algorithm and the auxiliary loss with running moments. The squared
    bias is estimated without the Monte-Carlo noise of the mean, spread²/repeats."""
    U, V = U.clone().requires_grad_(), V.clone().requires_grad_()
    g_true = flat_gradient(peira_population_objective(J, U, V, lam), (U, V))
    gen = torch.Generator().manual_seed(seed)
    ny = J.shape[1]

    def sample():
        idx = torch.multinomial(J.flatten(), batch, replacement=True, generator=gen)
        return U[idx // ny], V[idx % ny]

    peira_loss = peira.PEIRALoss(U.shape[1], lam=lam, eta=eta).double()
    with torch.no_grad():
        for _ in range(20):  # warm the running moments up at these encoders
            peira_loss(*sample())
    grads = {"direct": [], "running": []}
    for _ in range(repeats):
        direct_loss = peira.peira_objective(*sample(), lam)
        running_loss = peira_loss(*sample())
        grads["direct"].append(flat_gradient(direct_loss, (U, V)))
        grads["running"].append(flat_gradient(running_loss, (U, V)))
    bias_spread = {}
    for name, gs in grads.items():
        gs = torch.stack(gs)
        mean = gs.mean(0)
        spread2 = (gs - mean).square().sum(1).sum() / (repeats - 1)
        bias2 = ((mean - g_true).square().sum() - spread2 / repeats).clamp_min(0)
        bias_spread[name] = (bias2.sqrt() / g_true.norm()).item(), (spread2.sqrt() / g_true.norm()).item()
    return bias_spread


def section_peira(args, figures):
    J = latent_mixture(args.n, args.seed + 10, symmetric=False)
    s, u, v = peira.nonlinear_cca(J)
    px, py, k, lam, n = J.sum(1), J.sum(0), args.k, args.lam, args.n
    a = peira.peira_filter(s[:k], lam)
    L_star = -((s[:k].sqrt() - lam).clamp_min(0).square()).sum().item() / 2
    UV0 = torch.cat([random_tables(args.starts, n, k, args.seed + 4),
                     random_tables(args.starts, n, k, args.seed + 5)], 1)
    # the closed-form field is the (negated) gradient of peira.aux_loss on population samples,
    # divided by the marginals (an L2(P) gradient)
    U0, V0 = UV0[0, :n].clone().requires_grad_(), UV0[0, n:].clone().requires_grad_()
    N, S = peira.moments(*population_samples(J, U0.detach(), V0.detach()))
    P, Q = peira.optimal_regressor(N, S, lam)
    gU, gV = torch.autograd.grad(peira.aux_loss(*population_samples(J, U0, V0), P, Q, lam), (U0, V0))
    l2_gradient = torch.cat([gU / px[:, None], gV / py[:, None]])
    field_err = (peira_field(J, lam)(UV0[:1])[0] + l2_gradient).abs().max().item()

    def objective(UV):  # −½Tr(S(N + λI)⁻¹) + (λ/2)Tr(N), batched over starts
        U, V = UV[:, :n], UV[:, n:]
        N = U.mT @ (px[:, None] * U) + V.mT @ (py[:, None] * V)
        E = U.mT @ J @ V
        SQ = torch.linalg.solve(N + lam * torch.eye(k), E + E.mT, left=False)
        return -0.5 * SQ.diagonal(dim1=1, dim2=2).sum(1) + 0.5 * lam * N.diagonal(dim1=1, dim2=2).sum(1)

    UV, t, steps, records = integrate(peira_field(J, lam), UV0, objective)
    L_traj = torch.stack(records)
    # the end value from peira itself, not from the objective above
    L_end = torch.stack([peira_population_objective(J, w[:n], w[n:], lam) for w in UV])
    worst_gap = (L_end - L_star).abs().max().item()
    rise = (L_traj[1:] - L_traj[:-1]).max().item()
    C_U, amp = amplitudes(u, px, UV[:, :n])
    C_V, _ = amplitudes(v, py, UV[:, n:])
    amp_err = (amp[:, :k] - a).abs().max().item()
    beyond_k = amp[:, k:].max().item() if amp.shape[1] > k else 0.0
    same_q = (C_U - C_V).abs().max().item()
    # collapse: none over the λ grid and k
    lams = [lam * c for c in LAM_GRID]
    collapse_by_k = {}
    for k_small in range(1, k + 1):
        lam_per_start = torch.tensor(lams).repeat_interleave(args.starts)
        UV0_small = torch.cat([random_tables(len(lam_per_start), n, k_small, args.seed + 6),
                               random_tables(len(lam_per_start), n, k_small, args.seed + 7)], 1)
        UV_small, *_ = integrate(peira_field(J, lam_per_start), UV0_small)
        _, amp_small = amplitudes(u, px, UV_small[:, :n])
        expected = peira.peira_filter(s[:k_small, None], lam_per_start[None, :]).T
        missed = (amp_small[:, :k_small] - expected).abs().max(1).values > 1e-4
        collapse_by_k[k_small] = missed.view(len(lams), -1).double().mean(1).tolist()
    worst_by_lam = [max(fractions) for fractions in zip(*collapse_by_k.values())]
    worst = max(worst_by_lam)
    # minibatch gradients at a random point: direct vs running moments
    bias_spread = {batch: gradient_bias_variance(J, UV0[0, :n], UV0[0, n:], lam, batch,
                                                 GRAD_REPEATS, 0.1, args.seed)
                   for batch in (16, 64, 256)}
    rows = [
        Row("closed-form flow = −gradient of peira.aux_loss: max error", theory=0.0,
            simulation=field_err, tolerance=1e-12),
        never_increases("objective", rise, tolerance=1e-10, where=" along the flow"),
        Row("every start reaches −Σ max(√s_i − λ, 0)²/2", theory=L_star, simulation=L_end.max().item(),
            tolerance=1e-8, error=worst_gap),  # the error of the worst start, not of the largest value
        Row("amplitudes = peira_filter(s, λ): max error", theory=0.0, simulation=amp_err, tolerance=1e-6),
        Row("no energy beyond the top k canonical functions", theory=0.0, simulation=beyond_k,
            tolerance=1e-6),
        Row("U and V share q_i and amplitudes: max |C_U − C_V|", theory=0.0, simulation=same_q,
            tolerance=1e-6),
        Row(f"collapse fraction, worst over k ≤ {k} and λ grid", theory=0.0, simulation=worst,
            tolerance=0.0),
    ]
    # two measurements side by side: the "theory" column holds the direct algorithm's value
    for batch, measured in bias_spread.items():
        direct, running = measured["direct"], measured["running"]
        rows.append(Row(f"batch {batch}: gradient bias, direct vs running moments (η 0.1)",
                        theory=direct[0], simulation=running[0]))
        rows.append(Row(f"batch {batch}: gradient spread, direct vs running moments",
                        theory=direct[1], simulation=running[1]))

    collapse_axes(figures).plot(lams, worst_by_lam, "k--", label="PEIRA, every k")
    amplitude_axes(figures, lam).plot(s.expand_as(amp).flatten(), amp.flatten(), "C1x", ms=5,
                                      label="PEIRA limits (tables)")

    return Section(rows, {
        "s": s.tolist(), "a": a.tolist(), "lam": lam, "k": k, "L_star": L_star,
        "L_end": L_end.tolist(), "amplitudes": amp.tolist(), "steps": steps, "t_end": t,
        "lam_grid": lams, "collapse_vs_lam": {str(k_small): v for k_small, v in collapse_by_k.items()},
        "gradient_bias_spread": {str(batch): r for batch, r in bias_spread.items()}})


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
    return nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(),
                         nn.Linear(64, k)).float()


def subspace_alignment(E, H):
    """Mean cos² of the principal angles between the spans of the columns of E and of H
    (samples in rows; in L2 of the sampling distribution)."""
    qe, qh = torch.linalg.qr(E)[0], torch.linalg.qr(H)[0]
    return torch.linalg.svdvals(qe.T @ qh).square().mean().item()


@dataclass
class MLPRun:
    """Two MLPs trained on a Gaussian pair, evaluated on held-out pairs (x_i, y_i)."""
    hermite_x: torch.Tensor   # (pairs, m): the first m Hermite functions at x_i
    hermite_y: torch.Tensor
    ux: torch.Tensor          # (pairs, NN_K): U(x_i) at the end of training
    vy: torch.Tensor
    trace: list               # {step, objective, alignment} at log-spaced steps


@functools.lru_cache(maxsize=1)
def train_mlps(seed):
    """Trains two MLPs U, V with peira.PEIRALoss (k = NN_K, λ = NN_LAM). Sections 4 and 5 read the
    same training, so it is kept for the next call with the same seed (run() clears it)."""
    torch.manual_seed(seed)
    k, m = NN_K, NN_K + 4
    gen = torch.Generator().manual_seed(seed + 20)
    x_test, y_test = gaussian_pair(50_000, gen)
    hermite_x, hermite_y = hermite(x_test, m), hermite(y_test, m)
    U, V = mlp(k), mlp(k)  # float32 networks, as in practice; evaluation in float64
    opt = torch.optim.Adam([*U.parameters(), *V.parameters()], lr=NN_LR)
    peira_loss = peira.PEIRALoss(k, lam=NN_LAM).float()

    def embed(x, y):
        return U(x[:, None].float()), V(y[:, None].float())

    # log-spaced: the representation forms in the first hundred steps
    checkpoints = {int(2 ** (i / 2)) for i in range(2 * int(math.log2(NN_STEPS)) + 1)} | {0, NN_STEPS}
    trace = []
    for step in tqdm(range(NN_STEPS + 1), desc="sections 4, 5: MLPs on a Gaussian pair", leave=False):
        frac = step / NN_STEPS
        if step in checkpoints:
            with torch.no_grad():
                ux, vy = (e.double() for e in embed(x_test, y_test))
            alignment = (subspace_alignment(ux, hermite_x[:, :k])
                         + subspace_alignment(vy, hermite_y[:, :k])) / 2
            trace.append({"step": step, "objective": peira.peira_objective(ux, vy, NN_LAM).item(),
                          "alignment": alignment})
        if step == NN_STEPS:
            break
        for group in opt.param_groups:
            group["lr"] = NN_LR * 0.5 * (1 + math.cos(math.pi * frac))
        peira_loss.eta = 0.5 - 0.4 * frac  # running-moment weight annealed 0.5 → 0.1
        loss = peira_loss(*embed(*gaussian_pair(NN_BATCH, gen)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return MLPRun(hermite_x, hermite_y, ux, vy, trace)


def section_mlps(args, figures):
    k, lam, m = NN_K, NN_LAM, NN_K + 4
    trained = train_mlps(args.seed)
    s = RHO ** torch.arange(m, dtype=torch.float64)
    a = peira.peira_filter(s[:k], lam)
    L_star = -((s[:k].sqrt() - lam).clamp_min(0).square()).sum().item() / 2
    L_end = trained.trace[-1]["objective"]
    C = trained.hermite_x.T @ trained.ux / len(trained.ux)    # E[h_i(x) U(x)]
    amp = C.norm(dim=1)
    amp_err = (amp[:k] - a).abs().max().item()
    beyond = amp[k:].max().item()
    s_lin, _, _ = peira.linear_cca(trained.ux, trained.vy)
    corr_err = (s_lin[:k - 1] - s[1:k]).abs().max().item()
    rows = [
        Row(f"MLPs (k={k}, λ={lam}, {NN_STEPS} Adam steps): objective reaches −Σ(√ρ^i − λ)²/2",
            theory=L_star, simulation=L_end, tolerance=0.01 * abs(L_star)),
        Row("amplitudes on Hermite functions = peira_filter(ρ^i, λ): max error", theory=0.0,
            simulation=amp_err, tolerance=0.05),
        Row(f"no energy on Hermite functions {k}..{m - 1}: max amplitude", theory=0.0,
            simulation=beyond, tolerance=0.05),
        Row("canonical correlations of the embeddings = ρ^i, 1 ≤ i < k: max error", theory=0.0,
            simulation=corr_err, tolerance=0.02),
    ]

    ax = amplitude_axes(figures, args.lam)
    s_grid = torch.linspace(0, 1, 400)
    ax.plot(s_grid, peira.peira_filter(s_grid, lam), "C3--", lw=1, label=f"peira_filter(s, {lam})")
    ax.plot(s, amp, "C3s", ms=5, mfc="none", label=f"PEIRA MLPs, λ = {lam}")

    return Section(rows, {"rho": RHO, "s": s.tolist(), "a": a.tolist(), "amplitudes": amp.tolist(),
                          "canonical_correlations": s_lin.tolist(), "L_star": L_star, "L_end": L_end})


def section_objective_tracks_alignment(args, figures):
    trace = train_mlps(args.seed).trace
    objective = torch.tensor([r["objective"] for r in trace])
    alignment = torch.tensor([r["alignment"] for r in trace])

    def ranks(values):
        return values.argsort().argsort()

    # Spearman's correlation: Pearson's on the ranks
    spearman = torch.corrcoef(torch.stack([ranks(objective), ranks(alignment)]).double())[0, 1].item()
    rows = [
        Row("objective tracks alignment with the canonical subspace (Spearman)", theory=-1.0,
            simulation=spearman, tolerance=0.2),
        Row("alignment with span{He_0..He_k-1} at the end", theory=1.0, simulation=alignment[-1].item(),
            tolerance=0.02),
    ]

    ax = figures.get("objective_vs_alignment.png", lambda: new_axes(
        (5, 3.5), xlabel="alignment with the canonical subspace", ylabel="PEIRA objective (held out)",
        title="the objective tracks representation quality"))
    points = ax.scatter([r["alignment"] for r in trace], [r["objective"] for r in trace],
                        c=[r["step"] for r in trace], cmap="viridis")
    ax.figure.colorbar(points, label="step")

    return Section(rows, {"trace": trace, "spearman": spearman})


# -----------------------------------------------------------------------------
# the final table, and main

SECTIONS = {1: section_linear, 2: section_simsiam, 3: section_peira, 4: section_mlps,
            5: section_objective_tracks_alignment}


def format_table(numbered_rows):
    """The final table from (section number, Row) pairs."""
    def number(x):
        return "—" if x is None else f"{x:.3g}"
    lines = [f"{'§':<2} {'claim':<74} {'theory':>10} {'simulation':>11} {'error':>9}  result"]
    for section, row in numbered_rows:
        lines.append(f"{section:<2} {row.claim:<74} {number(row.theory):>10} "
                     f"{number(row.simulation):>11} {number(row.error):>9}  {row.verdict()}")
    return "\n".join(lines)


def run(args):
    """Runs the chosen sections in order; prints the table, writes it, results.json and figures."""
    train_mlps.cache_clear()  # the networks of an earlier run in this process may use other settings
    figures = Figures()
    numbered_rows, results = [], {"config": vars(args)}
    for number in sorted(set(args.only or SECTIONS)):
        start = time.time()
        section = SECTIONS[number](args, figures)
        numbered_rows += [(number, row) for row in section.rows]
        results[f"section{number}"] = {**section.results, "seconds": time.time() - start,
                                       "rows": [row.as_json(number) for row in section.rows]}
        print(f"section {number} done in {time.time() - start:.1f} s", flush=True)
    figures.save(args.out)
    table = format_table(numbered_rows)
    print(table)
    passed = sum(row.passed is True for _, row in numbered_rows)
    failed = sum(row.passed is False for _, row in numbered_rows)
    print(f"{passed} passed, {failed} failed")
    results["all_passed"] = failed == 0
    with open(os.path.join(args.out, "table.txt"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    return results


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


if __name__ == "__main__":
    raise SystemExit(0 if main()["all_passed"] else 1)
