"""Plan in a world model's latent space on Two Rooms: success rates of every model, side by side
with a random policy and a shortest-path oracle, on the same seeded start/goal pairs.

    python plan.py                              # every <loss>.pt in out/two_rooms, 100 episodes
    python plan.py --models out/two_rooms/peira.pt --episodes 20
    python plan.py --seed 500                   # validation pairs: tune here, report --seed 1000

Planner: the cross-entropy method over sequences of the four actions (--samples sequences,
--iters iterations, --elites best kept, --horizon steps), cost Σ_t ‖ẑ_t − z_goal‖² of the GRU's
predicted embeddings against the goal image's embedding; receding horizon (replan every step, do
the first action of the best sequence). All episodes are planned as one batch.
Writes --out/plan.json and --out/trajectories.png.
"""
import argparse
import glob
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import two_rooms as tr

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--models", default="out/two_rooms", help="a folder of <loss>.pt, or comma-separated files")
parser.add_argument("--out", default="out/plan")
parser.add_argument("--episodes", type=int, default=100)
parser.add_argument("--seed", type=int, default=1000, help="start/goal pairs (training used 0; tune on 500)")
parser.add_argument("--horizon", type=int, default=16, help="planning horizon (actions)")
parser.add_argument("--samples", type=int, default=128, help="CEM sequences per iteration")
parser.add_argument("--elites", type=int, default=16)
parser.add_argument("--iters", type=int, default=2)


def cem(cost_fn, episodes, args, gen):
    """First action of the best sequence for each episode; cost_fn(actions (E, S, H)) → (E, S)."""
    probs = torch.full((episodes, args.horizon, 4), 0.25)
    for _ in range(args.iters):
        seq = torch.multinomial(probs.reshape(-1, 4), args.samples, replacement=True, generator=gen)
        seq = seq.reshape(episodes, args.horizon, args.samples).transpose(1, 2)      # (E, S, H)
        cost = cost_fn(seq)
        elite = seq.gather(1, cost.topk(args.elites, dim=1, largest=False).indices[..., None].expand(-1, -1, args.horizon))
        probs = 0.5 * probs + 0.5 * F.one_hot(elite, 4).float().mean(1)
    return elite[:, 0, 0]


def latent_cost(model, pos, goal_z, res):  # goal_z: (E, D), one row per planned episode
    """Running cost of action sequences in the model: Σ_t ‖ẑ_t − z_goal‖²."""
    with torch.no_grad():
        z0 = model.encode(tr.render(pos, res))

    def cost(seq):
        e, s, h = seq.shape
        with torch.no_grad():
            pred = model.rollout(z0.repeat_interleave(s, 0), seq.reshape(e * s, h))
        return (pred - goal_z.repeat_interleave(s, 0)[:, None]).square().sum(-1).sum(-1).reshape(e, s)
    return cost


def planner(model, goals, args, gen):
    """A policy that plans with the model towards the goal images' embeddings."""
    with torch.no_grad():
        goal_z = model.encode(tr.render(goals, model.res))
    return lambda pos, episodes: cem(latent_cost(model, pos, goal_z[episodes], model.res), len(pos), args, gen)


LATTICE = 32  # an episode's positions are start + STEP·(i, j), |i|, |j| ≤ LATTICE covers the arena


class DistanceField:
    """Exact number of steps to the goal from every reachable position of each episode (positions
    stay on the lattice start + STEP·(i, j)), by breadth-first relaxation on the true dynamics."""

    def __init__(self, starts, goals):
        offs = torch.arange(-LATTICE, LATTICE + 1) * tr.STEP
        grid = starts[:, None, None] + torch.stack(torch.meshgrid(offs, offs, indexing="ij"), -1)
        self.starts, self.ok = starts, tr.free(grid)
        inf = torch.full(self.ok.shape, float("inf"))
        D = torch.where(self.ok & ((grid - goals[:, None, None]).norm(dim=-1) < tr.SUCCESS_DIST), 0.0, inf)
        while True:
            nb = torch.stack([self.shift(D, m) for m in range(4)]).amin(0)
            new = torch.where(self.ok, torch.minimum(D, nb + 1), inf)
            if torch.equal(new, D):
                break
            D = new
        self.D = D

    def shift(self, D, m):
        """D at the neighbour reached by move m from every cell (inf where that move is blocked)."""
        dx, dy = tr.MOVES[m].long().tolist()
        out = torch.full_like(D, float("inf"))
        src = D[:, max(dx, 0):D.shape[1] + min(dx, 0), max(dy, 0):D.shape[2] + min(dy, 0)]
        out[:, max(-dx, 0):D.shape[1] + min(-dx, 0), max(-dy, 0):D.shape[2] + min(-dy, 0)] = src
        return out

    def __call__(self, pos, episodes):
        """Steps to go from positions (E, ..., 2) of the given episodes (E,)."""
        extra = [1] * (pos.dim() - 2)
        ij = ((pos - self.starts[episodes].view(-1, *extra, 2)) / tr.STEP).round().long() + LATTICE
        e = episodes.view(-1, *extra).expand(ij.shape[:-1])
        return self.D[e, ij[..., 0].clamp(0, 2 * LATTICE), ij[..., 1].clamp(0, 2 * LATTICE)]


def true_cost(field, pos, episodes):
    """The planner's cost with the true dynamics: Σ_t steps-to-go (the oracle's model)."""
    def cost(seq):
        p, total = pos[:, None].expand(-1, seq.shape[1], -1), 0
        for t in range(seq.shape[2]):
            p = tr.move(p, seq[:, :, t])
            total = total + field(p, episodes).clamp(max=10 * tr.MAX_STEPS)
        return total
    return cost


def oracle_action(field, pos, episodes):
    """Shortest-path oracle: the move with the fewest steps to go."""
    cand = tr.move(pos[:, None], torch.arange(4)[None].expand(len(pos), -1))
    return field(cand, episodes).argmin(1)


def run_episodes(policy, starts, goals):
    """All episodes in one batch; policy(positions, episode indices) → actions, called for the
    episodes still running. Returns success, steps, paths and seconds of policy per step."""
    pos, done = starts.clone(), torch.zeros(len(starts), dtype=torch.bool)
    steps = torch.full((len(starts),), tr.MAX_STEPS)
    paths, seconds = [pos.clone()], 0.0
    for t in range(tr.MAX_STEPS):
        active = (~done).nonzero().flatten()
        if not len(active):
            break
        t0 = time.time()
        actions = policy(pos[active], active)
        seconds += time.time() - t0
        pos = pos.clone()
        pos[active] = tr.move(pos[active], actions)
        reached = ~done & ((pos - goals).norm(dim=1) < tr.SUCCESS_DIST)
        steps[reached] = t + 1
        done |= reached
        paths.append(pos.clone())
    return done, steps, torch.stack(paths, 1), seconds / max(len(paths) - 1, 1)


def wilson(k, n, z=1.96):
    """95% Wilson interval of a success rate."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def load_models(spec):
    paths = sorted(glob.glob(os.path.join(spec, "*.pt"))) if os.path.isdir(spec) else spec.split(",")
    paths = [p for p in paths if not os.path.basename(p).startswith("data_")]
    if not paths or not all(os.path.isfile(p) for p in paths):
        raise SystemExit(f"no world models at {spec}: train them with `python two_rooms.py` first")
    models = {}
    for p in paths:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        model = tr.WorldModel(ckpt["config"]["res"], ckpt["config"]["latent"])
        model.load_state_dict(ckpt["model"])
        models[ckpt["config"]["loss"]] = model.eval()
    return models


def figure(paths, starts, goals, out, res=64):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(paths), figsize=(3.2 * len(paths), 3.7))
    for ax, (name, p) in zip(axes, paths.items()):
        ax.imshow(tr.wall_image(res), cmap="Greys", extent=(0, tr.ARENA, tr.ARENA, 0))
        for e in range(min(4, len(starts))):
            ax.plot(p[e, :, 0], p[e, :, 1], lw=1.2, color=f"C{e}")
            ax.plot(*starts[e], "o", color=f"C{e}", ms=5)
            ax.plot(*goals[e], "*", color=f"C{e}", ms=10)
        ax.set_title(name, fontsize=10)
        ax.set(xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(os.path.join(out, "trajectories.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.elites > args.samples or args.horizon < 1:
        parser.error("need --episodes ≥ 1, --elites ≤ --samples, --horizon ≥ 1")
    models = load_models(args.models)
    os.makedirs(args.out, exist_ok=True)
    starts, goals = tr.start_goal_pairs(args.episodes, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    field = DistanceField(starts, goals)
    policies = {"oracle (shortest path)": lambda pos, episodes: oracle_action(field, pos, episodes),
                "random": lambda pos, episodes: torch.randint(0, 4, (len(pos),), generator=gen)}
    for name, model in models.items():
        policies[f"{name} + CEM"] = planner(model, goals, args, gen)
    rows, paths = [], {}
    for name, policy in tqdm(policies.items(), desc="methods", leave=False):
        success, steps, path, per_step = run_episodes(policy, starts, goals)
        k = int(success.sum())
        lo, hi = wilson(k, args.episodes)
        rows.append({"method": name, "success": k / args.episodes, "ci95": [lo, hi],
                     "mean_steps": steps[success].float().mean().item() if k else None,
                     "plan_ms_per_step": 1e3 * per_step})
        paths[name] = path
    print(f"\nTwo Rooms, {args.episodes} episodes (start/goal seed {args.seed}), success within "
          f"{tr.SUCCESS_DIST} units in {tr.MAX_STEPS} steps\n")
    print("| method | success | 95% CI | mean steps (successes) | planning ms/step |\n|---|---|---|---|---|")
    for r in rows:
        steps = "—" if r["mean_steps"] is None else f"{r['mean_steps']:.0f}"
        print(f"| {r['method']} | {100 * r['success']:.0f}% | {100 * r['ci95'][0]:.0f}–{100 * r['ci95'][1]:.0f}% | "
              f"{steps} | {r['plan_ms_per_step']:.1f} |")
    with open(os.path.join(args.out, "plan.json"), "w") as fh:
        json.dump({"config": vars(args), "rows": rows}, fh, indent=1)
    figure(paths, starts, goals, args.out)
    return rows


if __name__ == "__main__":
    main()
