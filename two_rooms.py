"""Two Rooms: an environment, its offline data, and world models trained with PEIRA, PLDM or LeWM.

    python two_rooms.py                        # PEIRA, PLDM and LeWM world models, one after another
    python two_rooms.py --losses peira         # one objective
    python two_rooms.py --res 64 --steps 4000  # PLDM's 64-px rendering (GPU)
    python plan.py                             # then plan with every model in --out

A square arena (PLDM's 64-unit geometry: 4-unit border, a 3-unit vertical wall at x = 32 with one
door) holds a dot agent drawn as a Gaussian blob in channel 0, the walls in channel 1. Actions:
up, down, left, right, a fixed step; walls and the border block motion. The offline data are
random-policy trajectories whose action persists with probability MOMENTUM, so some cross the
door. A world model is a state encoder V (Impala CNN) and a state-action encoder
U(s, a_1..a_H) = GRU(V(s), a) unrolled H steps; --loss peira applies peira.PEIRALoss between
U's predictions and V of the observed future states; pldm and lewm add their regularisers to a
prediction loss, with the same model, data and budget. Writes into --out: the cached data,
<loss>.pt (weights + config), metrics.jsonl, and <loss>.png (loss curve, latents by position).
"""
import argparse
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
parser.add_argument("--res", type=int, default=32, help="rendering resolution (32 on CPU, 64 as PLDM)")
parser.add_argument("--trajectories", type=int, default=3000, help="offline trajectories")
parser.add_argument("--length", type=int, default=32, help="steps per trajectory")
parser.add_argument("--no-door-data", action="store_true", help="drop trajectories that cross the door")
parser.add_argument("--horizon", type=int, default=8, help="H: steps the GRU predicts open-loop")
parser.add_argument("--latent", type=int, default=32, help="embedding dimension")
parser.add_argument("--steps", type=int, default=1000, help="Adam steps per model")
parser.add_argument("--batch-size", type=int, default=64, help="windows per step")
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--lam", type=float, default=0.1, help="PEIRA λ")
parser.add_argument("--seed", type=int, default=0)

ARENA, BORDER, WALL_X, WALL_HALF = 64.0, 4.0, 32.0, 1.5  # PLDM's geometry (units = 64-px pixels)
DOOR_Y, DOOR_HALF = 10.0, 4.0
STEP = 2.0                      # distance moved per action
MARGIN = 1.0                    # the agent's radius: how close to a wall it can get
BLOB_SIGMA = 1.3                # Gaussian blob std at 64 px (scaled with --res)
MOVES = torch.tensor([[0.0, -1.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])  # up, down, left, right
MOMENTUM = 0.8                  # probability of repeating the previous action in the data
SUCCESS_DIST = 2.0              # success: within one step of the goal (PLDM: 1 unit, continuous moves)
MAX_STEPS = 200                 # episode length (PLDM)
# PLDM (Sobal et al. 2025) coefficients: prediction, variance, covariance, temporal similarity, IDM
PLDM_COEFFS = (1.0, 3.98, 6.92, 0.742, 1.07)
LEWM_SIGREG = 0.09              # LeWM: prediction + 0.09 · SIGReg
SIGREG_DIRECTIONS, SIGREG_KNOTS = 256, 17
PEIRA_ETA = (0.9, 0.5)          # running-moment weight, annealed linearly


# -----------------------------------------------------------------------------
# environment

def free(pos):
    """Whether positions (..., 2) are inside the arena and off the wall (the door is free)."""
    x, y = pos[..., 0], pos[..., 1]
    inside = (x >= BORDER + MARGIN) & (x <= ARENA - BORDER - MARGIN) & (y >= BORDER + MARGIN) & (y <= ARENA - BORDER - MARGIN)
    in_wall = ((x - WALL_X).abs() < WALL_HALF + MARGIN) & ((y - DOOR_Y).abs() > DOOR_HALF - MARGIN)
    return inside & ~in_wall


def move(pos, actions):
    """One step for a batch: positions (..., 2), actions (...) in 0..3; blocked moves stay."""
    new = pos + STEP * MOVES.to(pos.device)[actions]
    return torch.where(free(new)[..., None], new, pos)


def wall_image(res):
    c = (torch.arange(res) + 0.5) * ARENA / res
    y, x = torch.meshgrid(c, c, indexing="ij")
    border = (x < BORDER) | (x > ARENA - BORDER) | (y < BORDER) | (y > ARENA - BORDER)
    wall = ((x - WALL_X).abs() < WALL_HALF) & ((y - DOOR_Y).abs() > DOOR_HALF)
    return (border | wall).float()


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
    pos = torch.empty(0, 2)
    while len(pos) < n:
        cand = torch.stack([torch.empty(2 * n).uniform_(*x_range, generator=gen),
                            torch.empty(2 * n).uniform_(BORDER + MARGIN, ARENA - BORDER - MARGIN, generator=gen)], 1)
        pos = torch.cat([pos, cand[free(cand)]])
    return pos[:n]


def start_goal_pairs(n, seed):
    """PLDM's evaluation: start x ∈ [6.6, 28.4], goal x ∈ [35.6, 57.4], swapped half the time."""
    gen = torch.Generator().manual_seed(seed)
    left, right = sample_free(n, gen, (6.6, 28.4)), sample_free(n, gen, (35.6, 57.4))
    swap = torch.rand(n, generator=gen) < 0.5
    return torch.where(swap[:, None], right, left), torch.where(swap[:, None], left, right)


class TwoRooms:
    """Gymnasium-style API: reset(seed) → obs, info; step(a) → obs, reward, terminated, truncated, info."""

    def __init__(self, res=32):
        self.res = res

    def reset(self, seed=None):
        start, goal = start_goal_pairs(1, 0 if seed is None else seed)
        self.pos, self.goal, self.t = start[0], goal[0], 0
        return render(self.pos, self.res), {"pos": self.pos, "goal": self.goal, "goal_obs": render(self.goal, self.res)}

    def step(self, action):
        self.pos, self.t = move(self.pos, torch.tensor(action)), self.t + 1
        done = bool((self.pos - self.goal).norm() < SUCCESS_DIST)
        return render(self.pos, self.res), float(done), done, self.t >= MAX_STEPS, {"pos": self.pos}


# -----------------------------------------------------------------------------
# offline data

def random_trajectories(n, length, seed, no_door):
    """Positions (n, length + 1, 2) and actions (n, length) of the momentum random policy."""
    gen = torch.Generator().manual_seed(seed)
    pos = [sample_free(n, gen)]
    act = torch.randint(0, 4, (n,), generator=gen)
    actions = []
    for _ in range(length):
        keep = torch.rand(n, generator=gen) < MOMENTUM
        act = torch.where(keep, act, torch.randint(0, 4, (n,), generator=gen))
        actions.append(act)
        pos.append(move(pos[-1], act))
    pos, actions = torch.stack(pos, 1), torch.stack(actions, 1)
    if no_door:
        keep = (pos[..., 0] < WALL_X).all(1) | (pos[..., 0] > WALL_X).all(1)
        pos, actions = pos[keep], actions[keep]
    return pos, actions


def load_data(args):
    """The offline data, generated once and cached in --out."""
    name = f"data_n{args.trajectories}_T{args.length}_s{args.seed}{'_nodoor' if args.no_door_data else ''}.pt"
    path = os.path.join(args.out, name)
    if os.path.isfile(path):
        data = torch.load(path, weights_only=True)
        return data["pos"], data["actions"]
    pos, actions = random_trajectories(args.trajectories, args.length, args.seed, args.no_door_data)
    tmp = path + ".tmp"
    torch.save({"pos": pos, "actions": actions}, tmp)
    os.replace(tmp, path)
    return pos, actions


def crossing_fraction(pos):
    side = pos[..., 0] < WALL_X
    return (side != side[:, :1]).any(1).float().mean().item()


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
    """V(s) = Impala(s); U(s, a_1..a_H) = GRU(V(s), a): the hidden state is the prediction."""

    def __init__(self, res, latent):
        super().__init__()
        self.encoder = Impala(res, latent)
        self.gru = nn.GRUCell(4, latent)
        self.res, self.latent = res, latent

    def encode(self, obs):
        shape = obs.shape[:-3]
        return self.encoder(obs.reshape(-1, *obs.shape[-3:])).reshape(*shape, self.latent)

    def rollout(self, z0, actions):
        """Predicted embeddings (B, H, D) after each of the actions (B, H)."""
        z, out = z0, []
        onehot = F.one_hot(actions, 4).float()
        for t in range(actions.shape[1]):
            z = self.gru(onehot[:, t], z)
            out.append(z)
        return torch.stack(out, 1)


# -----------------------------------------------------------------------------
# objectives

def variance_covariance(z):
    """VICReg's std hinge and off-diagonal covariance of z (B, D)."""
    z = z - z.mean(0)
    var = F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean()
    c = z.T @ z / (len(z) - 1)
    return var, (c.square().sum() - c.diagonal().square().sum()) / z.shape[1]


def sigreg(z, gen):
    """LeJEPA's SIGReg: Epps–Pulley statistic of random 1-D projections against N(0, 1)."""
    dirs = F.normalize(torch.randn(z.shape[1], SIGREG_DIRECTIONS, generator=gen).to(z.device), dim=0)
    h = z @ dirs                                                        # (N, M)
    t = torch.linspace(0, 3, SIGREG_KNOTS, device=z.device)
    th = h[..., None] * t                                               # (N, M, T)
    err = (th.cos().mean(0) - torch.exp(-t ** 2 / 2)) ** 2 + th.sin().mean(0) ** 2
    w = torch.exp(-t ** 2 / 2) * err
    integral = ((w[..., 1:] + w[..., :-1]) / 2 * (t[1] - t[0])).sum(-1)  # trapezoid rule
    return len(z) * integral.mean()


def world_model_loss(name, model, obs, actions, peira_loss, idm, gen):
    """The objective on windows obs (B, H+1, 2, R, R), actions (B, H); returns (loss, parts)."""
    z = model.encode(obs)                                               # (B, H+1, D)
    pred = model.rollout(z[:, 0], actions)                              # (B, H, D)
    target = z[:, 1:]
    if name == "peira":
        loss = peira_loss(pred.reshape(-1, model.latent), target.reshape(-1, model.latent))
        return loss, {}
    mse = F.mse_loss(pred, target)
    if name == "lewm":
        reg = torch.stack([sigreg(z[:, t], gen) for t in range(z.shape[1])]).mean()
        return mse + LEWM_SIGREG * reg, {"pred": mse.item(), "sigreg": reg.item()}
    vc = [variance_covariance(z[:, t]) for t in range(z.shape[1])]
    var, cov = torch.stack([v for v, _ in vc]).mean(), torch.stack([c for _, c in vc]).mean()
    sim = (z[:, 1:] - z[:, :-1]).square().sum(-1).mean()
    logits = idm(torch.cat([z[:, :-1], z[:, 1:]], -1))
    inv = F.cross_entropy(logits.reshape(-1, 4), actions.reshape(-1))
    a, b, c, d, e = PLDM_COEFFS
    return a * mse + b * var + c * cov + d * sim + e * inv, \
        {"pred": mse.item(), "var": var.item(), "cov": cov.item(), "sim": sim.item(), "idm": inv.item()}


def sample_windows(pos, actions, batch, horizon, gen):
    """Random windows: positions (B, H+1, 2) and actions (B, H)."""
    n, length = actions.shape
    i = torch.randint(0, n, (batch,), generator=gen)
    t = torch.randint(0, length - horizon + 1, (batch,), generator=gen)
    steps = t[:, None] + torch.arange(horizon + 1)
    return pos[i[:, None], steps], actions[i[:, None], steps[:, :-1]]


# -----------------------------------------------------------------------------
# training

def train(name, args, pos, actions, device):
    torch.manual_seed(args.seed)
    model = WorldModel(args.res, args.latent).to(device)
    idm = nn.Sequential(nn.Linear(2 * args.latent, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    peira_loss = peira.PEIRALoss(args.latent, lam=args.lam, eta=PEIRA_ETA[0]).to(device)
    params = list(model.parameters()) + (list(idm.parameters()) if name == "pldm" else [])
    opt = torch.optim.Adam(params, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    history, t0 = [], time.time()
    for step in tqdm(range(args.steps), desc=f"{name} world model", leave=False):
        frac = step / args.steps
        for g in opt.param_groups:  # cosine learning rate
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * frac))
        peira_loss.eta = PEIRA_ETA[0] + (PEIRA_ETA[1] - PEIRA_ETA[0]) * frac
        p, a = sample_windows(pos, actions, args.batch_size, args.horizon, gen)
        loss, parts = world_model_loss(name, model, render(p.to(device), args.res), a.to(device), peira_loss, idm, gen)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{name}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            if name == "peira":  # the aux loss's value means little: log the objective itself
                parts = {"objective": peira_loss.objective()}
            history.append({"loss_fn": name, "step": step, "loss": loss.item(), **parts})
    seconds = time.time() - t0
    path = os.path.join(args.out, f"{name}.pt")
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "config": {**vars(args), "loss": name}, "seconds": seconds}, tmp)
    os.replace(tmp, path)
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as fh:
        for h in history:
            fh.write(json.dumps(h) + "\n")
    figure(name, model, history, args, device)
    return model, history, seconds


@torch.no_grad()
def figure(name, model, history, args, device):
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
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    key = "objective" if name == "peira" else "loss"
    ax[0].plot([h["step"] for h in history], [h[key] for h in history])
    ax[0].set(xlabel="step", ylabel=key, title=f"{name}: training {key}")
    for k, (coord, label) in enumerate(((grid[:, 0], "x (wall at 32)"), (grid[:, 1], "y (door at 10)"))):
        sc = ax[k + 1].scatter(pc[:, 0], pc[:, 1], c=coord, s=6, cmap="coolwarm" if k == 0 else "viridis")
        fig.colorbar(sc, ax=ax[k + 1], label=label)
        ax[k + 1].set(xlabel="PC 1", ylabel="PC 2", title=f"latents of positions, coloured by {label[0]}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parser.parse_args(argv)
    losses = args.losses.split(",")
    if any(name not in ("peira", "pldm", "lewm") for name in losses):
        parser.error(f"--losses takes peira, pldm, lewm; got {args.losses}")
    if args.horizon >= args.length or args.res < 8 or args.steps < 1 or not args.lam > 0:
        parser.error("need --horizon < --length, --res ≥ 8, --steps ≥ 1, --lam > 0")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pos, actions = load_data(args)
    print(f"offline data: {len(pos)} trajectories × {args.length} steps, "
          f"{100 * crossing_fraction(pos):.0f}% cross the door")
    rows = []
    for name in losses:
        _, history, seconds = train(name, args, pos, actions, device)
        rows.append((name, history[-1]["loss"], seconds))
        print(f"{name}: final loss {history[-1]['loss']:.4f}, {seconds:.0f} s")
    print("\n| objective | final loss | training time (s) |\n|---|---|---|")
    for name, loss, seconds in rows:
        print(f"| {name} | {loss:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
