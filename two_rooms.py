"""Two Rooms: an environment, its offline data, and world models trained with PEIRA, PLDM or LeWM.

    python two_rooms.py                          # PEIRA, PLDM and LeWM world models, one after another
    python two_rooms.py --losses peira --seed 1  # one objective, another training seed: peira-seed1.pt
    python two_rooms.py --seeds 0,1,2,3,4 && python plan.py --episodes 200  # five seeds, summarised
    python two_rooms.py --losses pldm --without var --out out/ablations  # PLDM without a term
    python two_rooms.py --no-door-data --out out/no_door   # data that never cross the door
    python two_rooms.py --losses peira --moments pooled --out out/pooled  # PEIRA's default before (README)
    python two_rooms.py --res 64 --steps 8000    # PLDM's 64-px rendering (GPU)
    python plan.py                               # then plan with every model in --out

A square arena (PLDM's 64-unit geometry: 4-unit border, a 3-unit vertical wall at x = 32 with one
door at y = 10) holds a dot agent drawn as a Gaussian blob in channel 0, the walls in channel 1 (the
fraction of each pixel they cover: at 16 px the 3-unit wall is a column pair at 0.375).
Actions: up, down, left, right, a fixed step; walls and the border block motion.

Offline data: random-policy trajectories whose action persists with probability MOMENTUM; a
fraction --door-fraction of them is guided through the door first, as PLDM's data force door
crossings (PLDM's paper: trained without crossings, its planning success falls from 97.8% to
34.4%). The data are cached in --out under a hash of every parameter they depend on.

World model: a state encoder V(s) = LayerNorm(Impala CNN(s)) and a state-action encoder U(s, a_1..a_h) =
the h-step open-loop rollout of a recurrent cell from V(s): z ← LayerNorm(z + MLP(z, a)) (or PLDM's GRU
cell, --predictor gru), the encoder's LayerNorm applied to every output as PLDM does. --losses peira
applies a peira.PEIRALoss at each horizon h ≤ --horizon, between U's h-step predictions and V of the
states h steps on (one set of moments per horizon; --moments pooled: one over all horizons); pldm and
lewm add their regularisers to a prediction loss, with the same model, data and budget. Writes into
--out: the cached data, <model>.pt (weights, config, PEIRA's regressor with pooled moments),
metrics.jsonl (training curves, open-loop prediction error by horizon on held-out trajectories,
PEIRA's regressors' eigenvalues), and <model>.png (training curve, latents of a grid of positions);
<model> is the objective's name, with -seed<s> for --seed s ≠ 0 (peira-seed1.pt), so that seeds share
--out.

References:
  PLDM: V. Sobal, W. Zhang, K. Cho, R. Balestriero, T. G. J. Rudner and Y. LeCun, "Learning from
    Reward-Free Offline Data: A Case for Planning with Latent Dynamics Models", arXiv preprint,
    2025, arXiv:2502.14819 (Two Rooms, its data, loss and evaluation; its code's
    objectives/vicreg.py for the loss terms).
  LeWM: L. Maes, Q. Le Lidec, D. Scieur, Y. LeCun and R. Balestriero, "LeWorldModel: Stable
    End-to-End Joint-Embedding Predictive Architecture from Pixels", arXiv preprint, 2026,
    arXiv:2603.19312.
  SIGReg: R. Balestriero and Y. LeCun, "LeJEPA: Provable and Scalable Self-Supervised Learning
    Without the Heuristics", arXiv preprint, 2025, arXiv:2511.08544; T. W. Epps and L. B. Pulley,
    "A Test for Normality Based on the Empirical Characteristic Function", Biometrika 70(3), 1983.
  VICReg: A. Bardes, J. Ponce and Y. LeCun, "VICReg: Variance-Invariance-Covariance Regularization
    for Self-Supervised Learning", ICLR 2022, arXiv:2105.04906.
  Impala CNN: L. Espeholt et al., "IMPALA: Scalable Distributed Deep-RL with Importance Weighted
    Actor-Learner Architectures", ICML 2018, arXiv:1802.01561.
"""
import argparse
import hashlib
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import peira

# -----------------------------------------------------------------------------
# hyperparameters

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--losses", default="peira,pldm,lewm", help="comma-separated: peira, pldm, lewm")
parser.add_argument("--out", default="out/two_rooms")
parser.add_argument("--res", type=int, default=16, help="rendering resolution (16 on CPU, 64 as PLDM)")
parser.add_argument("--trajectories", type=int, default=2000, help="offline trajectories")
parser.add_argument("--length", type=int, default=64, help="steps per trajectory")
parser.add_argument("--door-fraction", type=float, default=0.5, help="trajectories guided through the door")
parser.add_argument("--no-door-data", action="store_true", help="no door-guided data; drop every crossing")
parser.add_argument("--horizon", type=int, default=16, help="steps unrolled open-loop in training")
parser.add_argument("--latent", type=int, default=32, help="embedding dimension")
parser.add_argument("--predictor", default="mlp", choices=("mlp", "gru"),
                    help="the recurrent cell: residual MLP, or PLDM's GRU")
parser.add_argument("--steps", type=int, default=1000, help="Adam steps per model")
parser.add_argument("--batch-size", type=int, default=64, help="windows per step")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--lam", type=float, default=0.3,
                    help="PEIRA λ (the best of 0.03, 0.1, 0.3 on validation pairs)")
parser.add_argument("--eta-start", type=float, default=0.9, help="PEIRA: running-moment weight η at step 0")
parser.add_argument("--eta-end", type=float, default=0.5, help="PEIRA: η at the last step (linear anneal)")
parser.add_argument("--center", action=argparse.BooleanOptionalAction, default=False,
                    help="PEIRA: centred moments (the batch means subtracted)")
parser.add_argument("--moments", default="per-horizon", choices=("per-horizon", "pooled"),
                    help="PEIRA: one set of moments per horizon (their losses summed; chosen on the "
                         "validation pairs, where it kept its success at 4x the steps: README) or one over "
                         "the pairs of every horizon")
parser.add_argument("--without", default="", help="ablation: PLDM terms to drop, comma-separated: var, cov, "
                    "var_t, sim_t, idm")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--seeds", default="",
                    help="comma-separated training seeds, each training every objective (replaces --seed); "
                         "plan.py then summarises over them")

ARENA, BORDER, WALL_X, WALL_HALF = 64.0, 4.0, 32.0, 1.5  # PLDM's geometry (units = 64-px pixels)
DOOR_Y, DOOR_HALF = 10.0, 4.0
STEP = 2.0                      # distance moved per action
MARGIN = 1.0                    # the agent's radius: how close to a wall it can get
BLOB_SIGMA = 1.3                # Gaussian blob std at 64 px (scaled with --res)
MOVES = torch.tensor([[0.0, -1.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])  # up, down, left, right
MOMENTUM = 0.8                  # probability of repeating the previous action in the data
GUIDE_NOISE = 0.2               # door-guided trajectories: probability of a random action instead
DOOR_APPROACH = 6.0             # their waypoints: 6 units in front of the door on either side
DATA_VERSION = 2                # bump when the generator changes: the cache key holds it
RENDER_VERSION = 2              # bump when render() changes: checkpoints record it, plan.py checks it
SUCCESS_DIST = 2.0              # success: within one step of the goal (PLDM: 1 unit, continuous moves)
MAX_STEPS = 200                 # episode length (PLDM)
# PLDM's Two Rooms configuration: the coefficient of each term of its loss
PLDM_COEFFS = {"pred": 1.0, "var": 3.9843, "cov": 6.9238, "var_t": 0.24535, "sim_t": 0.74242, "idm": 1.072}
LEWM_SIGREG = 0.09              # LeWM: prediction + 0.09 · SIGReg
SIGREG_DIRECTIONS, SIGREG_KNOTS, SIGREG_T = 1024, 17, 3.0  # LeWM's: 1024 projections, 17 knots on [0, 3]
SIGREG_DT = SIGREG_T / (SIGREG_KNOTS - 1)  # the knots' spacing


# -----------------------------------------------------------------------------
# environment

def free(pos):
    """Whether positions (..., 2) are inside the arena and off the wall (the door is free)."""
    x, y = pos[..., 0], pos[..., 1]
    lo, hi = BORDER + MARGIN, ARENA - BORDER - MARGIN
    inside = (x >= lo) & (x <= hi) & (y >= lo) & (y <= hi)
    in_wall = ((x - WALL_X).abs() < WALL_HALF + MARGIN) & ((y - DOOR_Y).abs() > DOOR_HALF - MARGIN)
    return inside & ~in_wall


def move(pos, actions):
    """One step for a batch: positions (..., 2), actions (...) in 0..3; blocked moves stay."""
    new = pos + STEP * MOVES.to(pos.device)[actions]
    return torch.where(free(new)[..., None], new, pos)


def coverage(lo, hi, res):
    """The fraction of each of the res pixels along [0, ARENA] that the interval [lo, hi] covers."""
    edges = torch.arange(res + 1, dtype=torch.float64) * ARENA / res
    return ((edges[1:].clamp(max=hi) - edges[:-1].clamp(min=lo)).clamp_min(0) * res / ARENA).float()


def wall_image(res):
    """The walls and the border as a (res, res) image (rows y, columns x): the fraction of each
    pixel's area they cover, so that the 3-unit wall shows at every resolution (0.75 px at 16 px,
    where no pixel centre falls inside it). Computed as 1 − the free space's share, the free space
    being three disjoint rectangles: the two rooms and the door."""
    lo, hi = BORDER, ARENA - BORDER
    free_space = [((lo, WALL_X - WALL_HALF), (lo, hi)), ((WALL_X + WALL_HALF, hi), (lo, hi)),  # (x, y)
                  ((WALL_X - WALL_HALF, WALL_X + WALL_HALF), (DOOR_Y - DOOR_HALF, DOOR_Y + DOOR_HALF))]
    share = sum(coverage(*y, res)[:, None] * coverage(*x, res)[None, :] for x, y in free_space)
    return (1 - share).clamp(0, 1)


def render(pos, res):
    """Observations (..., 2, res, res) in [0, 1] for positions (..., 2), vectorised."""
    c = (torch.arange(res, device=pos.device) + 0.5) * ARENA / res
    sigma = BLOB_SIGMA * 64 / res
    gx = torch.exp(-(c - pos[..., 0:1]) ** 2 / (2 * sigma ** 2))  # (..., res) separable blob
    gy = torch.exp(-(c - pos[..., 1:2]) ** 2 / (2 * sigma ** 2))
    blob = gy[..., :, None] * gx[..., None, :]
    walls = wall_image(res).to(pos.device).expand_as(blob)
    return torch.stack([blob, walls], -3)


def sample_free(n, gen, x_range=(BORDER + MARGIN, ARENA - BORDER - MARGIN)):
    """n uniform positions off the walls, x in x_range (rejection sampling)."""
    pos = torch.empty(0, 2)
    while len(pos) < n:
        cand = torch.stack([torch.empty(2 * n).uniform_(*x_range, generator=gen),
                            torch.empty(2 * n).uniform_(BORDER + MARGIN, ARENA - BORDER - MARGIN,
                                                        generator=gen)], 1)
        pos = torch.cat([pos, cand[free(cand)]])
    return pos[:n]


def start_goal_pairs(n, seed):
    """PLDM's evaluation: start x ∈ [6.6, 28.4], goal x ∈ [35.6, 57.4], swapped half the time."""
    gen = torch.Generator().manual_seed(seed)
    left, right = sample_free(n, gen, (6.6, 28.4)), sample_free(n, gen, (35.6, 57.4))
    swap = torch.rand(n, generator=gen) < 0.5
    return torch.where(swap[:, None], right, left), torch.where(swap[:, None], left, right)


class TwoRooms:
    """Gymnasium-style: reset(seed) → obs, info; step(a) → obs, reward, terminated, truncated, info."""

    def __init__(self, res=32):
        self.res = res

    def reset(self, seed=None):
        start, goal = start_goal_pairs(1, 0 if seed is None else seed)
        self.pos, self.goal, self.t = start[0], goal[0], 0
        info = {"pos": self.pos, "goal": self.goal, "goal_obs": render(self.goal, self.res)}
        return render(self.pos, self.res), info

    def step(self, action):
        self.pos, self.t = move(self.pos, torch.tensor(action)), self.t + 1
        done = bool((self.pos - self.goal).norm() < SUCCESS_DIST)
        return render(self.pos, self.res), float(done), done, self.t >= MAX_STEPS, {"pos": self.pos}


# -----------------------------------------------------------------------------
# offline data

def random_trajectories(n, length, seed, door_fraction=0.0, no_door=False):
    """Positions (n, length + 1, 2) and actions (n, length). A fraction door_fraction of the
    trajectories is guided through the door (as PLDM's data force crossings): a noisy walk to a
    point in front of the door, through it, then on at random. The others, and every trajectory
    after its crossing, follow the momentum random policy. no_door drops every crossing one."""
    gen = torch.Generator().manual_seed(seed)
    position = sample_free(n, gen)
    side = torch.where(position[:, 0] < WALL_X, -1.0, 1.0)   # −1: left room
    door_y = torch.full((n,), DOOR_Y)
    waypoints = torch.stack([torch.stack([WALL_X + side * DOOR_APPROACH, door_y], 1),   # this side
                             torch.stack([WALL_X - side * DOOR_APPROACH, door_y], 1)],  # the other
                            1)                                                          # (n, 2, 2)
    # phase 0: heading for the first waypoint, 1: for the second, 2: free (unguided, or across)
    phase = torch.where(torch.rand(n, generator=gen) < door_fraction, 0, 2)
    action = torch.randint(0, 4, (n,), generator=gen)
    positions, actions, rows = [position], [], torch.arange(n)
    for _ in range(length):
        # random policy: the previous action again with probability MOMENTUM
        keep = torch.rand(n, generator=gen) < MOMENTUM
        action = torch.where(keep, action, torch.randint(0, 4, (n,), generator=gen))
        # guided trajectories: a greedy step to the waypoint (level with the door first, then across),
        # a random one with probability GUIDE_NOISE
        target = waypoints[rows, phase.clamp(max=1)]
        to_target = target - position
        vertical = torch.where(to_target[:, 1] > 0, 1, 0)      # down (y grows downwards), up
        horizontal = torch.where(to_target[:, 0] > 0, 3, 2)    # right, left
        greedy = torch.where(to_target[:, 1].abs() > STEP / 2, vertical, horizontal)
        guided = (phase < 2) & (torch.rand(n, generator=gen) >= GUIDE_NOISE)
        action = torch.where(guided, greedy, action)
        # move; a guided trajectory at its waypoint heads for the next one
        position = move(position, action)
        reached = (target - position).abs().amax(1) <= STEP / 2
        phase = torch.where((phase < 2) & reached, phase + 1, phase)
        positions.append(position)
        actions.append(action)
    positions, actions = torch.stack(positions, 1), torch.stack(actions, 1)
    if no_door:
        stays = (positions[..., 0] < WALL_X).all(1) | (positions[..., 0] > WALL_X).all(1)
        positions, actions = positions[stays], actions[stays]
    return positions, actions


def data_config(args):
    """Every parameter the offline data depend on: the cache key."""
    door_fraction = 0.0 if args.no_door_data else args.door_fraction
    return {"trajectories": args.trajectories, "length": args.length, "seed": args.seed,
            "door_fraction": door_fraction, "no_door": args.no_door_data, "momentum": MOMENTUM,
            "guide_noise": GUIDE_NOISE, "door_approach": DOOR_APPROACH, "step": STEP, "margin": MARGIN,
            "geometry": [ARENA, BORDER, WALL_X, WALL_HALF, DOOR_Y, DOOR_HALF], "generator": DATA_VERSION}


def data_path(args):
    """The data's cache file in --out, named by a hash of every parameter they depend on."""
    key = hashlib.sha1(json.dumps(data_config(args), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.out, f"data_{key}.pt")


def load_data(args):
    """The offline data, generated once and cached in --out (data_path)."""
    config, path = data_config(args), data_path(args)
    if os.path.isfile(path):
        try:
            data = torch.load(path, weights_only=True)
            if json.loads(data["config"]) == config:
                return data["pos"], data["actions"]
        except (RuntimeError, EOFError, KeyError, ValueError) as err:  # a truncated or foreign file
            print(f"cached data {path} unreadable ({type(err).__name__}): generating them again")
    pos, actions = random_trajectories(args.trajectories, args.length, args.seed, config["door_fraction"],
                                       args.no_door_data)
    tmp = path + ".tmp"  # written whole, then renamed: an interrupted run leaves no truncated cache
    torch.save({"pos": pos, "actions": actions, "config": json.dumps(config)}, tmp)
    os.replace(tmp, path)
    return pos, actions


def crossing_fraction(pos):
    """The fraction of trajectories (n, T, 2) that ever change room."""
    side = pos[..., 0] < WALL_X
    return (side != side[:, :1]).any(1).float().mean().item()


def sample_windows(pos, actions, batch, horizon, gen):
    """Random windows: positions (B, H+1, 2) and actions (B, H)."""
    n, length = actions.shape
    i = torch.randint(0, n, (batch,), generator=gen)
    t = torch.randint(0, length - horizon + 1, (batch,), generator=gen)
    steps = t[:, None] + torch.arange(horizon + 1)
    return pos[i[:, None], steps], actions[i[:, None], steps[:, :-1]]


# -----------------------------------------------------------------------------
# world model

class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Impala(nn.Module):
    """Impala CNN (16, 32, 32 channels; conv, max-pool, residual block per stage) → Linear."""

    def __init__(self, res, latent):
        super().__init__()
        layers, c_in = [], 2
        for c in (16, 32, 32):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.MaxPool2d(3, 2, 1), ResBlock(c)]
            c_in = c
        self.net = nn.Sequential(*layers, nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(32 * math.ceil(res / 8) ** 2, latent)

    def forward(self, obs):
        return self.head(self.net(obs))


class WorldModel(nn.Module):
    """V(s) = LayerNorm(Impala(s)); U(s, a_1..a_h) = h steps of a recurrent cell from z = V(s):
    z ← LayerNorm(z + MLP(z, a)) (predictor "mlp"), or z ← LayerNorm(GRU(a, z)) (predictor "gru",
    PLDM's cell). The encoder's LayerNorm is applied to every prediction, as PLDM ties it
    (tie_backbone_ln): a GRU state alone is a convex mix of values in (−1, 1), after the LayerNorm a
    prediction reaches wherever an embedding can. The residual MLP cell predicts far better on Two
    Rooms at the same budget (README: open-loop error and planning success of both)."""

    def __init__(self, res, latent, predictor="mlp", hidden=128):
        super().__init__()
        self.encoder = Impala(res, latent).to(memory_format=torch.channels_last)
        self.norm = nn.LayerNorm(latent)
        if predictor == "gru":
            self.gru = nn.GRUCell(4, latent)
        else:
            # ReLUs in place: the same numbers, a planner's rollouts 15% faster on the CPU
            self.mlp = nn.Sequential(nn.Linear(latent + 4, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, latent))
        self.predictor, self.res, self.latent = predictor, res, latent

    def step(self, z, onehot):
        """The next embedding after one action (one-hot)."""
        if self.predictor == "gru":
            return self.norm(self.gru(onehot, z))
        return self.norm(z + self.mlp(torch.cat([z, onehot], -1)))

    def encode(self, obs):
        shape = obs.shape[:-3]
        # channels-last convolutions: 2-3× faster on CPU
        obs = obs.reshape(-1, *obs.shape[-3:]).contiguous(memory_format=torch.channels_last)
        return self.norm(self.encoder(obs)).reshape(*shape, self.latent)

    def rollout(self, z0, actions):
        """Predicted embeddings (B, H, D) after each of the actions (B, H)."""
        z, onehot, predicted = z0, F.one_hot(actions, 4).to(z0.dtype), []
        for t in range(actions.shape[1]):
            z = self.step(z, onehot[:, t])
            predicted.append(z)
        return torch.stack(predicted, 1)


# -----------------------------------------------------------------------------
# objectives

def variance_covariance(z):
    """VICReg's variance and covariance terms of z (B, D), written as train_cifar.py's vicreg_loss
    writes them, with PLDM's normalisation of the covariance."""
    n, d = z.shape
    z = z - z.mean(0)
    var = F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()  # one branch: no mean over two views
    c = z.T @ z / (n - 1)
    # PLDM's code divides the off-diagonal sum of squares by D(D − 1) (its adjust_cov), VICReg by D
    cov = (c.square().sum() - c.diagonal().square().sum()) / (d * (d - 1))
    return var, cov


def temporal_variance(z):
    """PLDM's variance term across time: VICReg's std hinge, over the frames of each window of z
    (B, T, D) instead of over the batch, averaged over windows and dimensions."""
    return F.relu(1 - torch.sqrt(z.var(1) + 1e-4)).mean()


def sigreg(z, gen, directions=None):
    """SIGReg (LeJEPA) as LeWM computes it: for random unit directions, the Epps–Pulley statistic
    of the projections of z (..., N, D) against N(0, 1), N ∫ w(t) |φ̂(t) − exp(−t²/2)|² dt over
    t ∈ [−3, 3] with w(t) = exp(−t²/2) (φ̂: their empirical characteristic function), averaged over
    the directions and the leading dimensions. directions (D, M): fixed ones; by default
    SIGREG_DIRECTIONS drawn from gen, shared by the leading dimensions as LeWM shares them."""
    if directions is None:
        directions = torch.randn(z.shape[-1], SIGREG_DIRECTIONS, generator=gen)
    projections = z @ F.normalize(directions.to(z), dim=0)              # (..., N, M)
    return z.shape[-2] * _EppsPulley.apply(projections).mean()


def _knot_waves(x):
    """(k, cos(t_k x), sin(t_k x)) for SIGReg's knots t_k = k·dt, k = 1 .. SIGREG_KNOTS − 1 (the knot
    t = 0 adds nothing: φ̂(0) = 1), by the three-term recurrence c_{k+1} = 2 cos(dt·x) c_k − c_{k−1}
    (likewise sin): two fused products a knot instead of a cosine and a sine."""
    c, s = (SIGREG_DT * x).cos(), (SIGREG_DT * x).sin()
    two_c1, c_prev, s_prev = 2 * c, torch.ones_like(x), torch.zeros_like(x)
    for k in range(1, SIGREG_KNOTS):
        if k > 1:
            c, c_prev = torch.addcmul(-c_prev, two_c1, c), c
            s, s_prev = torch.addcmul(-s_prev, two_c1, s), s
        yield k, c, s


class _EppsPulley(torch.autograd.Function):
    """Σ_k w_k ((C_k − g_k)² + S_k²) over dim −2 of x (..., N, M), with C_k, S_k the means over N of
    cos(t_k x), sin(t_k x), g_k = exp(−t_k²/2), and w_k the trapezoid weights on [0, 3] doubled (the
    integrand is even in t: weights 2 dt, dt at both ends, cover t < 0 as well) times g_k. The gradient
    in closed form, ∂/∂x_n = Σ_k 2 w_k t_k (S_k cos(t_k x_n) − (C_k − g_k) sin(t_k x_n)) / N; both passes
    go through chunks of CHUNK directions that stay in cache (a CPU spends its time on memory here,
    not on arithmetic)."""
    CHUNK = 128

    @staticmethod
    def knot(k):
        """(t_k, g_k = e^{−t_k²/2}, N(0, 1)'s characteristic function and the weight's kernel, w_k)
        for k ≥ 1 (the knot t = 0 adds nothing)."""
        t = k * SIGREG_DT
        gaussian = math.exp(-t ** 2 / 2)
        return t, gaussian, (SIGREG_DT if k == SIGREG_KNOTS - 1 else 2 * SIGREG_DT) * gaussian

    @staticmethod
    def forward(ctx, x):
        statistic = x.new_zeros(x.shape[:-2] + x.shape[-1:])
        # the gradient's coefficients 2 w_k t_k (C_k − g_k) and 2 w_k t_k S_k, (knots, 2, ..., 1, M)
        coefs = x.new_zeros((SIGREG_KNOTS, 2) + x.shape[:-2] + (1, x.shape[-1]))
        for j in range(0, x.shape[-1], _EppsPulley.CHUNK):
            cols = slice(j, j + _EppsPulley.CHUNK)
            for k, c, s in _knot_waves(x[..., cols]):
                t, gaussian, weight = _EppsPulley.knot(k)
                cos_gap, sin_mean = c.mean(-2, keepdim=True) - gaussian, s.mean(-2, keepdim=True)
                statistic[..., cols] += weight * (cos_gap.square() + sin_mean.square()).squeeze(-2)
                coefs[k, 0, ..., cols] = 2 * weight * t * cos_gap
                coefs[k, 1, ..., cols] = 2 * weight * t * sin_mean
        ctx.save_for_backward(x, coefs)
        return statistic

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, coefs = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        for j in range(0, x.shape[-1], _EppsPulley.CHUNK):
            cols = slice(j, j + _EppsPulley.CHUNK)
            acc = torch.zeros_like(x[..., cols])
            for k, c, s in _knot_waves(x[..., cols]):
                acc.addcmul_(coefs[k, 1, ..., cols], c).addcmul_(coefs[k, 0, ..., cols], s, value=-1)
            grad_x[..., cols] = acc * (grad[..., None, cols] / x.shape[-2])
        return grad_x


def world_model_loss(name, model, obs, actions, peira_loss, idm, gen, without=()):
    """The objective on windows obs (B, H+1, 2, R, R), actions (B, H); returns (loss, parts)."""
    z = model.encode(obs)                                               # (B, H+1, D)
    pred = model.rollout(z[:, 0], actions)                              # (B, H, D)
    target = z[:, 1:]
    if name == "peira" and isinstance(peira_loss, nn.ModuleList):  # --moments per-horizon
        return sum(loss_h(pred[:, h], target[:, h]) for h, loss_h in enumerate(peira_loss)), {}
    if name == "peira":
        loss = peira_loss(pred.reshape(-1, model.latent), target.reshape(-1, model.latent))
        return loss, {}
    mse = F.mse_loss(pred, target)
    if name == "lewm":
        sigreg_loss = sigreg(z.transpose(0, 1), gen)  # per frame, over the batch; mean over frames
        return mse + LEWM_SIGREG * sigreg_loss, {"pred": mse.item(), "sigreg": sigreg_loss.item()}
    # PLDM, each term as its code computes it (objectives/vicreg.py): variance and covariance of
    # the first frame, temporal variance of the later frames, temporal similarity a mean over
    # frames, windows and dimensions; inverse dynamics adapted to the discrete actions (see train)
    var, cov = variance_covariance(z[:, 0])
    var_t = temporal_variance(z[:, 1:])
    sim_t = (z[:, 1:] - z[:, :-1]).square().mean()
    logits = idm(torch.cat([z[:, :-1], z[:, 1:]], -1))
    idm_loss = F.cross_entropy(logits.reshape(-1, 4), actions.reshape(-1))
    coeffs = {term: 0.0 if term in without else coeff for term, coeff in PLDM_COEFFS.items()}
    loss = (coeffs["pred"] * mse + coeffs["var"] * var + coeffs["cov"] * cov + coeffs["var_t"] * var_t
            + coeffs["sim_t"] * sim_t + coeffs["idm"] * idm_loss)
    return loss, {"pred": mse.item(), "var": var.item(), "cov": cov.item(), "var_t": var_t.item(),
                  "sim_t": sim_t.item(), "idm": idm_loss.item()}


# -----------------------------------------------------------------------------
# evaluation and figures

@torch.no_grad()
def prediction_error(model, pos, actions, res, regressor=None, horizons=(1, 4, 8, 16, 32), n=256):
    """Open-loop error E‖ẑ_h − z_h‖² / E‖z − E z‖² of the model's h-step predictions on
    held-out windows (and of Pẑ_h for PEIRA's regressor P): how far the model can be trusted."""
    horizons = [h for h in horizons if h < actions.shape[1]]
    gen = torch.Generator().manual_seed(0)  # the same windows for every model
    window_pos, window_actions = sample_windows(pos, actions, n, max(horizons), gen)
    device = next(model.parameters()).device
    z = model.encode(render(window_pos.to(device), res))
    pred = model.rollout(z[:, 0], window_actions.to(device))
    spread = (z - z.mean((0, 1))).square().sum(-1).mean()
    errors = {"raw": (pred - z[:, 1:]).square().sum(-1).mean(0) / spread}
    if regressor is not None:
        errors["regressed"] = (pred @ regressor.T - z[:, 1:]).square().sum(-1).mean(0) / spread
    return {key: {h: e[h - 1].item() for h in horizons} for key, e in errors.items()}


@torch.no_grad()
def figure(label, model, history, args, device):
    """Loss curve, and a PCA of the latents of a grid of positions coloured by x and by y."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = torch.linspace(BORDER + MARGIN, ARENA - BORDER - MARGIN, 40)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    grid = grid[free(grid)]
    z = model.encode(render(grid.to(device), args.res)).cpu()
    z = z - z.mean(0)
    pc = z @ torch.linalg.svd(z, full_matrices=False).Vh[:2].T
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    key = "objective" if "objective" in history[-1] else "loss"
    axes[0].plot([h["step"] for h in history], [h[key] for h in history])
    axes[0].set(xlabel="step", ylabel=key, title=f"{label}: training {key}")
    panels = ((grid[:, 0], "x (wall at 32)", "coolwarm"), (grid[:, 1], "y (door at 10)", "viridis"))
    for ax, (coordinate, name, cmap) in zip(axes[1:], panels):
        points = ax.scatter(pc[:, 0], pc[:, 1], c=coordinate, s=6, cmap=cmap)
        fig.colorbar(points, ax=ax, label=name)
        ax.set(xlabel="PC 1", ylabel="PC 2", title=f"latents of positions, coloured by {name[0]}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{label}.png"), dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# training

def train(name, args, pos, actions, held_out, device):
    """Trains one world model with objective `name`; saves it, its metrics and its figure."""
    without = []
    if name == "pldm":  # the ablations drop PLDM's terms only
        without = [term for term in args.without.split(",") if term]
    # also the checkpoint's name: peira.pt for seed 0, peira-seed1.pt for seed 1, ..., so that models
    # of several seeds can share one --out
    seed = [f"seed{args.seed}"] if args.seed else []
    label = "-".join([name] + [f"without-{term}" for term in without] + seed)
    torch.manual_seed(args.seed)
    model = WorldModel(args.res, args.latent, args.predictor).to(device)
    # PLDM's inverse-dynamics term, adapted to the 4 discrete actions: a cross-entropy over them from
    # a 64-unit hidden layer, where PLDM regresses its 2-D continuous action with an MSE from a
    # 512-unit layer. Its weight stays PLDM's 1.072, tuned for that MSE and not re-tuned here
    idm = nn.Sequential(nn.Linear(2 * args.latent, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    copies = args.horizon if args.moments == "per-horizon" else 1
    peira_losses = nn.ModuleList(peira.PEIRALoss(args.latent, lam=args.lam, eta=args.eta_start,
                                                 center=args.center) for _ in range(copies)).to(device)
    peira_loss = peira_losses if args.moments == "per-horizon" else peira_losses[0]
    params = list(model.parameters()) + (list(idm.parameters()) if name == "pldm" else [])
    opt = torch.optim.Adam(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    history, t0 = [], time.time()
    for step in tqdm(range(args.steps), desc=f"{label} world model", leave=False):
        # schedule: cosine learning rate; PEIRA's running-moment weight annealed linearly
        progress = step / args.steps
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * progress))
        for loss_h in peira_losses:
            loss_h.eta = args.eta_start + (args.eta_end - args.eta_start) * progress
        # data: random windows of the offline trajectories, rendered
        window_pos, window_actions = sample_windows(pos, actions, args.batch_size, args.horizon, gen)
        obs = render(window_pos.to(device), args.res)
        # forward and loss
        loss, parts = world_model_loss(name, model, obs, window_actions.to(device), peira_loss, idm, gen,
                                       without)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{name}: non-finite loss at step {step}")
        # step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # log: every 20 steps and the last one
        if step % 20 == 0 or step == args.steps - 1:
            if name == "peira":  # the aux loss's value means little: log the objective itself
                parts = {"objective": sum(loss_h.objective() for loss_h in peira_losses)}
            history.append({"model": label, "step": step, "loss": loss.item(), **parts})
    seconds = time.time() - t0

    # open-loop prediction error on the held-out trajectories; PEIRA's regressors' spectra (with
    # per-horizon moments there is a regressor per horizon: none is saved for the planner's cost)
    regressor = peira_loss.P.float() if name == "peira" and args.moments == "pooled" else None
    model.eval()
    error = prediction_error(model, *held_out, args.res, regressor)
    print(f"{label}: open-loop prediction error / embedding variance, by horizon: "
          + ", ".join(f"{h}: {e:.2f}" for h, e in error["raw"].items()))
    history[-1]["prediction_error"] = error
    if name == "peira":
        spectra = [torch.linalg.eigvals(loss_h.P.double()).real.sort(descending=True).values.tolist()
                   for loss_h in peira_losses]
        if args.moments == "pooled":
            history[-1]["regressor_eigenvalues"] = spectra[0]
        else:
            history[-1]["regressor_eigenvalues_by_horizon"] = spectra

    # checkpoint (written whole, then renamed), metrics, figure
    path = os.path.join(args.out, f"{label}.pt")
    tmp = path + ".tmp"
    config = {**vars(args), "loss": name, "label": label, "render": RENDER_VERSION}
    torch.save({"model": model.state_dict(), "config": config,
                "seconds": seconds, "regressor": regressor}, tmp)
    os.replace(tmp, path)
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as fh:
        for record in history:
            fh.write(json.dumps(record) + "\n")
    figure(label, model, history, args, device)
    return model, history, seconds


def main(argv=None):
    args = parser.parse_args(argv)
    losses = args.losses.split(",")
    if any(name not in ("peira", "pldm", "lewm") for name in losses):
        parser.error(f"--losses takes peira, pldm, lewm; got {args.losses}")
    if not 1 <= args.horizon < args.length or args.res < 8 or args.steps < 1 or not args.lam > 0:
        parser.error("need 1 ≤ --horizon < --length, --res ≥ 8, --steps ≥ 1, --lam > 0")
    if not (0 < args.eta_start <= 1 and 0 < args.eta_end <= 1):
        parser.error(f"--eta-start and --eta-end must be in (0, 1] (got {args.eta_start}, {args.eta_end})")
    if not 0 <= args.door_fraction <= 1:
        parser.error(f"--door-fraction is a fraction in [0, 1], got {args.door_fraction}")
    unknown = {term for term in args.without.split(",") if term} - (set(PLDM_COEFFS) - {"pred"})
    if unknown:
        parser.error(f"--without takes var, cov, var_t, sim_t, idm; got {', '.join(sorted(unknown))}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    rows = []
    for seed in seeds:
        args.seed = seed  # the data and the initialisation: <model>-seed<s>.pt for s ≠ 0
        # offline data, and held-out trajectories from another seed for the prediction error
        pos, actions = load_data(args)
        print(f"offline data (seed {seed}): {len(pos)} trajectories × {args.length} steps, "
              f"{100 * crossing_fraction(pos):.0f}% cross the door")
        held_out = random_trajectories(256, args.length, args.seed + 7919, data_config(args)["door_fraction"],
                                       args.no_door_data)

        # one world model per objective, then a table of their final loss and open-loop error. Each
        # loss is the model's own objective (PEIRA's L_PEIRA, not its auxiliary loss): not comparable
        # across objectives, the open-loop errors are
        for name in losses:
            _, history, seconds = train(name, args, pos, actions, held_out, device)
            last = history[-1]
            own = last.get("objective", last["loss"])
            rows.append((last["model"], own, last["prediction_error"]["raw"], seconds))
            print(f"{last['model']}: final training loss (own objective) {own:.4f}, {seconds:.0f} s")
    horizons = " | ".join(f"error h={h}" for h in rows[0][2])
    print(f"\n| model | final training loss (own objective) | {horizons} | training time (s) |")
    print("|---" * (len(rows[0][2]) + 3) + "|")
    for label, loss, error, seconds in rows:
        errors = " | ".join(f"{e:.2f}" for e in error.values())
        print(f"| {label} | {loss:.4f} | {errors} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
