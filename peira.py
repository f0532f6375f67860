"""PEIRA: Predictive Embeddings through Inter-View Regressor Alignment.

The core of the method in one copy-pasteable file (torch only). The method: M. Arbel, with
B. Terver and J. Ponce, "Learning Predictive Embeddings through Inter-View Regressor Alignment",
CILVR seminar, NYU, 21 April 2026 (the talk), and the PEIRA preprint, arXiv:2605.17671 (2026).

Two encoders U, V map two views x, y of the same input to k-dim embeddings u, v.
With uncentered moments

    N = E[u uᵀ + v vᵀ],   S = E[u vᵀ + v uᵀ],   Q = (N + λI)⁻¹,   P = S Q,

P is the optimal symmetrized ridge regressor between the views,

    P = argmin_P ½E‖Pu − v‖² + ½E‖Pv − u‖² + (λ/2)‖P‖²_F,

and the encoders minimise

    L_PEIRA(U, V) = −½ Tr(P) + (λ/2) E[‖u‖² + ‖v‖²].

The global minimisers are the leading nonlinear CCA directions of (x, y), soft-thresholded:
U* = Σ_i a_i q_i u_i, V* = Σ_i a_i q_i v_i with a_i = sqrt(max(√s_i − λ, 0) / 2).

Training uses the auxiliary loss (same gradient as L_PEIRA when P, Q are the optimal ones)
with P, Q formed from running moments, all-reduced across ranks under data parallelism:

    >>> import torch
    >>> peira_loss = PEIRALoss(dim=8, lam=0.1, eta=0.5)
    >>> u, v = torch.randn(32, 8, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    >>> loss = peira_loss(u, v)     # update the moments, return L_aux (P, Q through solves)
    >>> loss.backward()
    >>> sorted(peira_loss.stats())[:4]
    ['alignment', 'embedding_std', 'eta', 'kept']

Contents, in this order: moments, regressor, objective, auxiliary loss, PEIRALoss; then the
tools to check the theory (nonlinear and linear CCA, the amplitudes of PEIRA's and SimSiam's
minimisers) and two diagnostics; last, the input checks and the computation precision.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "moments", "optimal_regressor", "peira_objective", "aux_loss", "aux_loss_from_moments", "PEIRALoss",
    "nonlinear_cca", "linear_cca", "canonical_correlations", "canonical_correlations_with_null",
    "peira_filter", "simsiam_filter",
    "effective_rank", "alignment",
]


# -----------------------------------------------------------------------------
# moments

def _moment_sums(u, v, scale=1.0):
    """scale · (Σ uuᵀ + vvᵀ, Σ uvᵀ + vuᵀ) over the batch, and Σ u, Σ v, in float32 or float64. Two
    products instead of three: with p = u + v and m = u − v, ppᵀ + mmᵀ = 2(uuᵀ + vvᵀ) and ppᵀ − mmᵀ =
    2(uvᵀ + vuᵀ). The factor scale / 2 rides in the products and the sums are formed in place: a
    fresh k×k temporary costs more than its arithmetic (the first touch of its memory)."""
    with _no_autocast(u):
        u, v = u.to(_compute_dtype(u)), v.to(_compute_dtype(u))
        p, m = u + v, u - v
        zero = p.new_zeros(())  # addmm's input, ignored at beta = 0: a product scaled for free
        pp = torch.addmm(zero, p.mT, p, beta=0, alpha=scale / 2)
        mm = torch.addmm(zero, m.mT, m, beta=0, alpha=scale / 2)
        sum_nn = pp.add_(mm)                                   # scale · ½(ppᵀ + mmᵀ)
        return sum_nn, mm.mul_(-2).add_(sum_nn), u.sum(0), v.sum(0)  # and scale · ½(ppᵀ − mmᵀ)


def _center_(N, S, mean_u, mean_v):
    """Centred moments, in place: E[(u − m_u)(u − m_u)ᵀ] = E[uuᵀ] − m_u m_uᵀ, and likewise."""
    N.addr_(mean_u, mean_u, alpha=-1).addr_(mean_v, mean_v, alpha=-1)
    S.addr_(mean_u, mean_v, alpha=-1).addr_(mean_v, mean_u, alpha=-1)
    return N, S


def moments(u, v, center=False):
    """Batch moments N = mean(uuᵀ + vvᵀ), S = mean(uvᵀ + vuᵀ) of embeddings u, v (B, k).

    Computed in float32 (float64 for float64 input) even under autocast; differentiable.
    With center=True the batch means are subtracted first.

    >>> u = torch.tensor([[1., 0.], [0., 1.]]); N, S = moments(u, u)
    >>> N.tolist(), S.tolist()
    ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    """
    _check_pair(u, v)
    with _no_autocast(u):
        if center:
            u, v = u - u.mean(0), v - v.mean(0)
        return _moment_sums(u, v, 1 / u.shape[0])[:2]


# -----------------------------------------------------------------------------
# regressor

def optimal_regressor(N, S, lam):
    """(P, Q) with Q = (N + λI)⁻¹ and P = S Q; Q from a Cholesky factorisation of N + λI.

    P minimises ½E‖Pu − v‖² + ½E‖Pv − u‖² + (λ/2)‖P‖²_F. Differentiable in N and S.
    """
    _check_lam(lam)
    if N.ndim != 2 or N.shape[0] != N.shape[1] or N.shape != S.shape:
        raise ValueError(f"N and S must be square and of equal shape, got {tuple(N.shape)} "
                         f"and {tuple(S.shape)}")
    with _no_autocast(N):
        N, S = N.to(_compute_dtype(N)), S.to(_compute_dtype(N))
        eye = torch.eye(N.shape[0], dtype=N.dtype, device=N.device)
        Q = torch.cholesky_inverse(torch.linalg.cholesky(N + lam * eye))  # Q itself is needed
        return S @ Q, Q


# -----------------------------------------------------------------------------
# objective

def _objective(N, S, lam):
    """−½ Tr(S (N + λI)⁻¹) + (λ/2) Tr(N): L_PEIRA written with the moments."""
    P, _ = optimal_regressor(N, S, lam)
    return -0.5 * torch.trace(P) + 0.5 * lam * torch.trace(N)


def peira_objective(u, v, lam, center=False):
    """Exact minibatch objective −½Tr(P) + (λ/2)E(‖u‖² + ‖v‖²), differentiable through the
    inverse (the "direct" algorithm: its gradient is a biased estimate of the population one).
    """
    _check_lam(lam)
    N, S = moments(u, v, center)
    return _objective(N, S, lam)


# -----------------------------------------------------------------------------
# auxiliary loss

def aux_loss(u, v, P, Q, lam):
    """Auxiliary loss ½E[(Qu)ᵀ(Pu − v)] + ½E[(Qv)ᵀ(Pv − u)] + (λ/2)E[‖u‖² + ‖v‖²].

    P and Q are constants (detached). With the optimal P, Q of the same moments, its gradient
    equals that of L_PEIRA; per sample ∂u = QSQu − Qv + λu and ∂v = QSQv − Qu + λv.
    """
    _check_lam(lam)
    _check_pair(u, v)
    with _no_autocast(u):
        dtype = _compute_dtype(u)
        u, v = u.to(dtype), v.to(dtype)
        P, Q = P.detach().to(dtype), Q.detach().to(dtype)
        qu, qv = u @ Q, v @ Q                                  # rows of (Qu)ᵀ, Q symmetric
        fit = (qu * (u @ P.T - v)).sum(1) + (qv * (v @ P.T - u)).sum(1)
        return 0.5 * fit.mean() + 0.5 * lam * (u.square().sum(1) + v.square().sum(1)).mean()


def aux_loss_from_moments(u, v, N, S, lam):
    """aux_loss(u, v, *optimal_regressor(N, S, lam), lam) without forming P or Q: the value and
    the gradient are the same.

    With a = Qu, b = Qv (triangular solves on one Cholesky factor of N + λI) and Pu = S a, the fit
    terms are aᵀ(S a − v) and bᵀ(S b − u): k³/3 + O(Bk²) operations instead of 3k³ + O(Bk²), and
    no host synchronisation (a failed factorisation returns NaN: in float32 it needs λ below about
    k·eps·‖N‖). N and S are constants (detached), S symmetric; first derivatives only.
    """
    _check_lam(lam)
    _check_pair(u, v)
    with _no_autocast(u):
        dtype = _compute_dtype(u)
        N, S = N.detach().to(dtype), S.detach().to(dtype)
        shifted = N.clone()
        shifted.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(shifted)
        x = torch.cat([u.mT, v.mT], 1).to(dtype).mT  # rows u then v, column-major: read by the solves as is
        loss = _AuxLossFromFactor.apply(x, L, S, lam)
        return loss + torch.where(info == 0, 0.0, math.nan).to(dtype)


class _AuxLossFromFactor(torch.autograd.Function):
    """aux_loss_from_moments on the stacked rows x = [u; v] (2B, k), with L the Cholesky factor of
    N + λI. Forward: a = Qx (rows), the fit Σ aᵀ(S a − x_partner); backward in closed form, the
    auxiliary gradient (Q S a − a_partner + λx) / B: one more solve, no product by S. x is column-
    major, as the solves leave their results: every elementwise step then reads one layout."""

    @staticmethod
    def forward(ctx, x, L, S, lam):
        batch = x.shape[0] // 2
        a = _solve_rows(L, x)                                   # rows (Qu)ᵀ then (Qv)ᵀ
        Sa = (S @ a.mT).mT                                      # rows (S a)ᵀ (S symmetric), column-major
        # the partner terms: u's partner is v and v's is u, and (Qu)ᵀv = (Qv)ᵀu, so they are twice Σ (Qu)ᵀv
        fit = _dot(a, Sa) - 2 * (a[:batch] * x[batch:]).sum()
        ctx.save_for_backward(x, L, Sa, a)
        ctx.lam = lam
        return 0.5 * (fit + lam * _dot(x, x)) / batch

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, L, Sa, a = ctx.saved_tensors
        batch = x.shape[0] // 2
        grad_x = _solve_rows(L, Sa)                             # Q S a, then in place:
        grad_x[:batch] -= a[batch:]                             # − the partner's a
        grad_x[batch:] -= a[:batch]
        return grad_x.add_(x, alpha=ctx.lam).mul_(grad / batch), None, None, None


def _solve_rows(L, x):
    """x Q = x L⁻ᵀ L⁻¹ for rows x (m, k), L the Cholesky factor of Q⁻¹: two triangular solves from
    the right. LAPACK's solves work on column-major matrices: x column-major is read without a
    transposed copy, and the result is column-major too."""
    return torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L.mT, x, upper=True, left=False),
                                         upper=False, left=False)


def _dot(a, b):
    """Σ a ∘ b for two matrices of the same shape: without a temporary when both are row-major or both
    column-major, through a copy otherwise."""
    if not a.is_contiguous():
        a, b = a.mT, b.mT
    return torch.dot(a.reshape(-1), b.reshape(-1))


# -----------------------------------------------------------------------------
# the training module: running moments, all-reduced under data parallelism

class PEIRALoss(nn.Module):
    """PEIRA loss with running moments (Algorithm 1 of the preprint, arXiv:2605.17671).

    forward(u, v), in training mode:
      1. batch moment sums of u, v, all-reduced across ranks when torch.distributed is
         initialised, so every rank sees the moments of the global batch (N and S are symmetric:
         one triangle of each is sent);
      2. N ← (1−η)N + η N_batch, S ← (1−η)S + η S_batch (the first batch initialises them);
      3. returns the auxiliary loss on the local batch with P, Q of the running moments, from one
         Cholesky factor and triangular solves (aux_loss_from_moments; P and Q themselves are
         formed only when asked for: .P, .Q, stats()). DDP's gradient averaging then gives the
         gradient of the global batch (for equal local batch sizes).
    In eval mode the running moments are used as they are. update(u, v) does steps 1 and 2 only
    (a monitor of another loss). With center=True, u and v are centered by the (global, detached)
    batch mean; this leaves the gradient exact because the auxiliary gradient is linear in the
    centered embeddings, which sum to zero over the batch.

    Built for a training step without host synchronisation: η is a buffer (set it between steps,
    `peira_loss.eta = 0.6`: torch.compile does not recompile), a global batch with a NaN or inf
    leaves the running moments as they were and makes the loss NaN on every rank (check the loss,
    as for any loss; non_finite_steps counts such batches), and N and S stay in float32 (float64
    after .double()) whatever .to(dtype) the module gets.
    """

    def __init__(self, dim, lam=0.1, eta=0.5, center=False):
        super().__init__()
        _check_lam(lam)
        self.dim, self.lam, self.center = dim, lam, center
        self.register_buffer("N", torch.zeros(dim, dim))
        self.register_buffer("S", torch.zeros(dim, dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("non_finite_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("embedding_std", torch.zeros(()))
        self.register_buffer("eta_now", torch.zeros(()))
        self.eta = eta

    @property
    def eta(self):
        """Weight of the new batch in the running moments (a 0-d tensor; set it with a number)."""
        return self.eta_now.clone()

    @eta.setter
    def eta(self, value):
        if not torch.is_tensor(value) and not 0 < value <= 1:  # a tensor is taken as it is: no sync
            raise ValueError(f"eta must be in (0, 1], got {value}")
        self.eta_now.fill_(value)

    def extra_repr(self):
        return f"dim={self.dim}, lam={self.lam}, center={self.center}"

    def _apply(self, fn, recurse=True):
        """.to(), .half(), .cuda(), ...: the buffers follow, except that they never go below float32
        (running averages in bfloat16 would lose the small updates)."""
        def keep_precision(t):
            out = fn(t)
            if out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
                return t.to(device=out.device, dtype=torch.float32)
            return out
        return super()._apply(keep_precision, recurse)

    def forward(self, u, v):
        self._check_dim(u, v)
        if self.training:
            mu, mv, finite = self._update(u, v, all_reduce=True)
        elif self.steps == 0:
            raise RuntimeError("PEIRALoss in eval mode has no running moments yet")
        else:
            mu, mv = u.detach().mean(0), v.detach().mean(0)
            finite = torch.ones((), dtype=torch.bool, device=u.device)
        if self.center:
            u, v = u - mu.to(u.dtype), v - mv.to(v.dtype)
        loss = aux_loss_from_moments(u, v, self.N, self.S, self.lam)
        return loss + torch.where(finite, 0.0, math.nan).to(loss.dtype)  # NaN on every rank

    @torch.no_grad()
    def update(self, u, v, all_reduce=True):
        """Steps 1 and 2 only: the running moments take in the batch (a monitor of another loss).
        With all_reduce=False each rank keeps the moments of its own batches; as they are linear in
        the batch moments, all_reduce_moments() at logging time gives those of the global batches
        (center=False, equal local batch sizes), saving a k² all-reduce per step."""
        self._check_dim(u, v)
        if self.center and not all_reduce:
            raise ValueError("update(all_reduce=False) needs center=False: centering is not linear")
        self._update(u, v, all_reduce)

    @torch.no_grad()
    def all_reduce_moments(self):
        """Average N and S over the ranks (after update(..., all_reduce=False))."""
        if dist.is_available() and dist.is_initialized():
            flat = _pack_symmetric(self.N, self.S)
            dist.all_reduce(flat)
            N, S = _unpack_symmetric(flat / dist.get_world_size(), self.dim)
            self.N.copy_(N)
            self.S.copy_(S)

    def _check_dim(self, u, v):
        _check_pair(u, v)
        if u.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {u.shape[1]}, PEIRALoss was built for {self.dim}")

    @torch.no_grad()
    def _update(self, u, v, all_reduce):
        """The running moments take in this batch unless it holds a non-finite value (on any rank):
        such a batch is zeroed before the products and weighted 0, so nothing waits for the host.
        Returns the batch's (global) means and whether it was finite."""
        u, v = u.detach().to(_compute_dtype(u)), v.detach().to(_compute_dtype(u))
        bad = ~torch.isfinite(_dot(u, u) + _dot(v, v))  # NaN, inf, or squares overflowing
        u, v = torch.where(bad, 0.0, u), torch.where(bad, 0.0, v)
        N, S, mean_u, mean_v, bad = self._batch_moments(u, v, bad, all_reduce)
        finite = ~bad
        var = N.diagonal() - mean_u.square() - mean_v.square()  # per-dim var u + var v
        std = (var / 2).clamp_min(0).sqrt().mean()
        self.embedding_std.lerp_(std.to(self.embedding_std.dtype), finite.to(self.embedding_std.dtype))
        if self.center:
            _center_(N, S, mean_u, mean_v)
        weight = torch.where(self.steps == 0, 1.0, self.eta_now).to(self.N.dtype) * finite
        self.N.lerp_(N.to(self.N.dtype), weight)
        self.S.lerp_(S.to(self.S.dtype), weight)
        self.steps += finite.long()
        self.non_finite_steps += bad.long()
        return mean_u, mean_v, finite

    def _batch_moments(self, u, v, bad, all_reduce):
        """The batch's moments N, S and means, and whether it was non-finite; the global batch's when
        distributed (one all_reduce of its sums, one triangle of each symmetric one)."""
        if not (all_reduce and dist.is_available() and dist.is_initialized()):
            n = u.shape[0]
            N, S, sum_u, sum_v = _moment_sums(u, v, 1 / n)
            return N, S, sum_u / n, sum_v / n, bad
        sum_nn, sum_ss, sum_u, sum_v = _moment_sums(u, v)
        n = torch.full((), u.shape[0], dtype=sum_u.dtype, device=sum_u.device)  # made on the device: no copy
        flat = torch.cat([_pack_symmetric(sum_nn, sum_ss), sum_u, sum_v, n[None], bad.to(n.dtype)[None]])
        dist.all_reduce(flat)
        k = self.dim
        sum_nn, sum_ss = _unpack_symmetric(flat[:k * k + k], k)
        sum_u, sum_v = flat[k * k + k:k * k + 2 * k], flat[k * k + 2 * k:-2]
        n, bad = flat[-2], flat[-1] > 0
        return sum_nn.div_(n), sum_ss.div_(n), sum_u / n, sum_v / n, bad

    @property
    def P(self):
        return optimal_regressor(self.N, self.S, self.lam)[0]

    @property
    def Q(self):
        return optimal_regressor(self.N, self.S, self.lam)[1]

    def objective(self):
        """The exact objective L_PEIRA evaluated at the running moments."""
        return _objective(self.N, self.S, self.lam).item()

    def stats(self):
        """Diagnostics for logging: objective, Tr P, effective rank of N, alignment ⟨P, S⟩, the
        median of the positive canonical correlations of the running moments (on the span of N) and
        the fraction of the k dimensions whose correlation exceeds λ², the mean per-dimension std of
        the last batch's embeddings, current eta, and the number of batches skipped for non-finite
        values. The running moments average about B(2 − η)/η samples, often few against k: their
        correlations mostly measure finite-sample noise (canonical_correlations_with_null reads
        them against their null on a large sample)."""
        P = self.P
        corr = canonical_correlations(self.N, self.S)
        positive = corr[corr > 0]  # an anti-correlated direction is never kept
        return {
            "objective": self.objective(),
            "trace_P": torch.trace(P).item(),
            "rank_N": effective_rank(self.N),
            "alignment": alignment(P, self.S),
            "median_corr": positive.median().item() if len(positive) else math.nan,
            "kept": (corr > self.lam ** 2).double().sum().item() / self.dim,
            "embedding_std": self.embedding_std.item(),
            "eta": self.eta_now.item(),
            "non_finite_steps": int(self.non_finite_steps),
        }


def _pack_symmetric(N, S):
    """The k² + k numbers that hold two symmetric k×k matrices: N's upper triangle and S's strict
    lower one in one matrix, then S's diagonal."""
    return torch.cat([(N.triu() + S.tril(-1)).flatten(), S.diagonal()])


def _unpack_symmetric(flat, k):
    """(N, S) from _pack_symmetric's k² + k numbers."""
    packed, diag = flat[:k * k].view(k, k), flat[k * k:]
    upper, lower = packed.triu(), packed.tril(-1)
    return upper + upper.triu(1).T, lower + lower.T + torch.diag(diag)


# -----------------------------------------------------------------------------
# canonical correlation analysis: what the global minimisers are made of

def nonlinear_cca(joint, k=None):
    """Nonlinear CCA of a discrete joint probability table J (nx, ny).

    Returns (s, u, v): canonical correlations s (descending, s[0] = 1) and canonical
    functions as tables u (nx, k), v (ny, k), orthonormal in L2 of each marginal, with
    E[u_i(x) v_j(y)] = s_i δ_ij. From the SVD of D_x^{-1/2} J D_y^{-1/2}; the sign of each
    pair is fixed so that u_i's largest entry in absolute value is positive.

    >>> s, u, v = nonlinear_cca(torch.tensor([[0.4, 0.1], [0.1, 0.4]], dtype=torch.float64))
    >>> [round(x, 6) for x in s.tolist()]
    [1.0, 0.6]
    """
    if joint.ndim != 2:
        raise ValueError(f"joint must be a 2-D table, got shape {tuple(joint.shape)}")
    joint = joint.to(_compute_dtype(joint))
    if not torch.isfinite(joint).all() or (joint < 0).any():
        raise ValueError("joint has negative or non-finite entries")
    total = joint.sum().item()
    if abs(total - 1) > 1e-6:
        raise ValueError(f"joint must sum to 1, sums to {total:.8g}")
    px, py = joint.sum(1), joint.sum(0)
    if (px == 0).any() or (py == 0).any():
        raise ValueError("joint has a value of x or y with zero probability; drop its row/column")
    M = joint / px.sqrt()[:, None] / py.sqrt()[None, :]
    A, s, Bh = torch.linalg.svd(M)
    k = min(joint.shape) if k is None else k
    u, v = A[:, :k] / px.sqrt()[:, None], Bh[:k].T / py.sqrt()[:, None]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    return s[:k], u * sign, v * sign


def linear_cca(x, y, k=None, eps=0.0):
    """Linear CCA of data matrices x (n, dx), y (n, dy) (centered inside).

    Returns (s, A, B): canonical correlations (descending) and projections A (dx, k),
    B (dy, k) such that (x − x̄)A and (y − ȳ)B have identity covariance and
    cross-covariance diag(s). eps is added to both covariances' diagonals.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (n, d) with the same n, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError("linear_cca needs at least 2 samples")
    dtype = _compute_dtype(x)
    x, y = x.to(dtype), y.to(dtype)
    x, y = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]
    Lx = torch.linalg.cholesky(x.T @ x / n + eps * torch.eye(x.shape[1], dtype=dtype, device=x.device))
    Ly = torch.linalg.cholesky(y.T @ y / n + eps * torch.eye(y.shape[1], dtype=dtype, device=y.device))
    # whitened cross-covariance Lx⁻¹ Cxy Ly⁻ᵀ
    W = torch.linalg.solve_triangular(Lx, x.T @ y / n, upper=False)
    W = torch.linalg.solve_triangular(Ly, W.T, upper=False).T
    Uw, s, Vh = torch.linalg.svd(W)
    k = min(x.shape[1], y.shape[1]) if k is None else k
    A = torch.linalg.solve_triangular(Lx.T, Uw[:, :k], upper=True)
    B = torch.linalg.solve_triangular(Ly.T, Vh[:k].T, upper=True)
    return s[:k], A, B


def canonical_correlations(N, S, rtol=None):
    """Canonical correlations of the embeddings u, v from their symmetrised moments N, S:
    the eigenvalues of N^{-1/2} S N^{-1/2} (descending), on the span of N: eigenvalues of N below
    rtol · the largest are left out (default: k times the precision of N's dtype, so directions
    that are rounding noise are not whitened into correlations). With exchangeable views
    E[uuᵀ] = E[vvᵀ] = N/2 and E[uvᵀ] = S/2, so these are the (uncentered) canonical correlations
    of u and v. PEIRA keeps a direction at its optimum only if its correlation s exceeds λ²
    (peira_filter). Computed in float64, returned in N's dtype and on its device.
    """
    if rtol is None:
        rtol = N.shape[0] * torch.finfo(N.dtype).eps
    dtype = N.dtype
    N, S = N.double(), S.double()
    eig, vec = torch.linalg.eigh((N + N.T) / 2)
    keep = eig > rtol * eig.max().clamp_min(1e-300)
    whiten = vec[:, keep] / eig[keep].sqrt()
    return torch.linalg.eigvalsh(whiten.T @ ((S + S.T) / 2) @ whiten).flip(0).to(dtype)


def canonical_correlations_with_null(u, v, generator=None, shuffles=5):
    """Canonical correlations of paired embeddings u, v (n, k), centered, with their null: the same
    statistic on the pairs shuffled across samples, i.e. the level finite-sample noise alone reaches
    at this n against k (about √(2k/n) at the top); the null is the largest of `shuffles` shuffles,
    rank by rank, so that pure noise passes null[0] with probability about 1 / (shuffles + 1). Read
    the first against the second: directions above null[0] carry a correlation the sample can see.
    Both descending, in float64.

    Running moments average about B(2 − η)/η samples, often not many more than k: their canonical
    correlations (stats) mostly measure that noise. Here n should be large against k (e.g. two
    augmented views of each of 64 k images). The shuffle draws from generator (on v's device).
    """
    _check_pair(u, v)
    u, v = u.detach().double(), v.detach().double()
    corr = canonical_correlations(*moments(u, v, center=True))
    shuffled = (v[torch.randperm(len(v), generator=generator, device=v.device)] for _ in range(shuffles))
    null = [canonical_correlations(*moments(u, w, center=True)) for w in shuffled]
    return corr, torch.stack(null).amax(0)


# -----------------------------------------------------------------------------
# filters: amplitude of each canonical direction at the minimisers / equilibria

def peira_filter(s, lam):
    """Amplitudes of PEIRA's global minimisers: sqrt(max(√s − λ, 0) / 2)."""
    s = torch.as_tensor(s)
    return ((s.clamp_min(0).sqrt() - lam).clamp_min(0) / 2).sqrt()


def simsiam_filter(s, lam):
    """Amplitudes of the SimSiam-like dynamics' stable equilibria:
    (s + √(s² − 4λ)) / 2 if s² ≥ 4λ, else 0."""
    s = torch.as_tensor(s)
    disc = s.square() - 4 * lam
    return torch.where(disc >= 0, (s + disc.clamp_min(0).sqrt()) / 2, torch.zeros_like(s))


# -----------------------------------------------------------------------------
# diagnostics (PEIRALoss.stats)

def effective_rank(N):
    """exp(entropy of the normalised eigenvalues) of a PSD matrix (O. Roy and M. Vetterli, "The
    effective rank: a measure of effective dimensionality", EUSIPCO 2007)."""
    eig = torch.linalg.eigvalsh(N.double()).clamp_min(0)
    p = eig / eig.sum().clamp_min(1e-300)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()).item()


def alignment(P, S):
    """Cosine ⟨P, S⟩_F / (‖P‖_F ‖S‖_F) between the regressor and the cross moment."""
    P, S = P.double(), S.double()
    return ((P * S).sum() / (P.norm() * S.norm()).clamp_min(1e-300)).item()


# -----------------------------------------------------------------------------
# input checks and computation precision, used throughout the file

def _check_lam(lam):
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")


def _check_pair(u, v):
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(f"u and v must both have shape (batch, dim), got {tuple(u.shape)} "
                         f"and {tuple(v.shape)}")
    if u.shape[0] < 2:
        raise ValueError("batch size 1: moments need at least 2 samples per batch")


def _compute_dtype(x):
    """float64 stays float64; half, bfloat16 and float32 are computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_autocast(x):
    """Autocast would form the moments and the inverse in half precision: it is turned off there."""
    try:
        return torch.autocast(device_type=x.device.type, enabled=False)
    except RuntimeError:  # a device without autocast (e.g. meta) needs no guard
        return contextlib.nullcontext()
