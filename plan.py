"""Plan in a world model's latent space on Two Rooms: success rates of every model, side by side
with a random policy, a shortest-path oracle and the planner driven by the true dynamics, on the
same seeded start/goal pairs (always in different rooms, as in the evaluation of PLDM: Sobal et al.,
"Learning from Reward-Free Offline Data: A Case for Planning with Latent Dynamics Models", arXiv
preprint, 2025, arXiv:2502.14819).

    python plan.py                              # every <model>.pt in out/two_rooms, 100 episodes
    python plan.py --models out/two_rooms/peira.pt --episodes 20
    python plan.py --seed 500                   # validation pairs: tune here, report --seed 1000
    python plan.py --no-keep-plan               # the planner before --keep-plan (add --no-remember-blocked:
                                                # before that too)
    python plan.py --summary out/plan/plan.json,out/plan_peira/plan.json   # rows of two runs, summarised

Planner (model-predictive control by random shooting): every step, --samples piecewise-constant sequences of
the four actions (--segments constant pieces over --horizon steps) and the previous best plan are rolled out
in the model; a sequence costs the smallest latent distance ‖ẑ_t − z_goal‖ it reaches, relative to the
current one, plus --time-cost per step to get there; the first action of the cheapest is taken (but see
--keep-plan below). The time cost (0.01, chosen on the validation pairs) breaks near-ties: with 0.003 the
planner was all but indifferent between a distance reached now and one reached a dozen steps later, and near
the goal it took detours whose predicted end was closer by about the model's error, and circled the goal;
with 0.03 it walks into walls rather than round them. The row "true dynamics + planner, position cost" runs
the same planner on the real dynamics with the wall-blind distance of positions, the ideal of a latent that
encodes position (a perfect model, a cost that ignores the wall), so a reader can tell planner from model.
All episodes are planned as one batch, and each step of the rollouts is predicted once for the sequences that
agree so far (rollout_distances). Each row draws from its own generator, seeded from --seed and the row's
name: a row's success and paths are the same planned alone or with others.
A move after which the observation did not change (into a wall the model believed passable, e.g. the door's
edge, a fraction of a pixel away at 16 px) is never again the first move of a plan from there in that
episode (--no-remember-blocked: it may be, and such a model pushes into the wall to the end).
The plan is kept from one step to the next unless a new sequence is cheaper by more than the model's own
error at the plan's arrival (the step where its cost is least; open_loop_error: the RMS error of its
open-loop predictions on held-out trajectories) times --margin-scale (1), relative to the current distance
(--no-keep-plan: the cheapest always wins): the kept plan won as the least of many noisy costs and, costed
again, has lost that luck; without the margin, near the goal a new lucky detour wins at every step and the
agent circles the goal. The true dynamics have no error.
Beside the success table: success by the length of the shortest path (the pairs in thirds), the failures by
kind (failure_kinds: near the goal, pushing against a wall, elsewhere), and how far each model's latent
distance points the way (distance_profile: its rank correlation with the true steps to a goal over the
arena, against a shuffled null, and where it stops rising).
Writes --out/plan.json, --out/trajectories.png and --out/distance_maps.png (each model's latent distance to
one goal over the arena).
"""
import argparse
import glob
import json
import math
import os
import pickle
import re
import time
import zlib

import torch
from tqdm import tqdm

import two_rooms as tr

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--models", default="out/two_rooms",
                    help="a folder of <model>.pt, or comma-separated files")
parser.add_argument("--out", default="out/plan")
parser.add_argument("--episodes", type=int, default=100)
parser.add_argument("--seed", type=int, default=1000,
                    help="seed of the start/goal pairs: tune the planner on 500, report on 1000")
parser.add_argument("--horizon", type=int, default=64, help="planning horizon (actions)")
parser.add_argument("--samples", type=int, default=256, help="action sequences scored per step")
parser.add_argument("--segments", type=int, default=3, help="constant-action segments per sequence")
parser.add_argument("--replan", type=int, default=1, help="plan every this many steps")
parser.add_argument("--remember-blocked", action=argparse.BooleanOptionalAction, default=True,
                    help="a move after which the observation did not change (into a wall) is never again "
                         "the first move of a plan from that observation in the episode (chosen on the "
                         "validation pairs: README)")
parser.add_argument("--keep-plan", action=argparse.BooleanOptionalAction, default=True,
                    help="the previous plan is kept unless a new one is cheaper by more than the model's "
                         "open-loop error at the kept plan's arrival, relative to the current distance "
                         "(chosen on the validation pairs: README)")
parser.add_argument("--margin-scale", type=float, default=1.0,
                    help="--keep-plan's margin as a multiple of the model's open-loop error (tuned alike for "
                         "every objective on the validation pairs: README)")
parser.add_argument("--time-cost", type=float, default=0.01,
                    help="cost per step of the plan, relative to the current distance to the goal")
parser.add_argument("--cost", default="latent", choices=("latent", "regressed"),
                    help="PEIRA's cost: ‖ẑ − z_goal‖ or ‖Pẑ − z_goal‖ with its regressor P (models with "
                         "pooled moments only)")
parser.add_argument("--summary", default="",
                    help="plan nothing: success over training seeds (mean ± std, paired differences) from "
                         "the rows of these comma-separated plan.json files, planned with the same settings "
                         "(a later file's row replaces one of its name)")
# what plan.py did before a flag existed: a plan.json without the flag's key is read with this value
BEFORE_FLAG = {"remember_blocked": False, "keep_plan": False}


def segment_sequences(episodes, samples, horizon, segments, gen):
    """Random piecewise-constant action sequences (E, S, H): each holds `segments` directions
    between random cut points, so that a few samples cover long detours (around a wall, through a
    door) that i.i.d. actions almost never draw."""
    directions = torch.randint(0, 4, (episodes, samples, segments), generator=gen)
    cuts = torch.randint(0, horizon + 1, (episodes, samples, segments - 1), generator=gen).sort(-1).values
    segment = (torch.arange(horizon)[:, None] >= cuts[..., None, :]).sum(-1)      # (E, S, H)
    return directions.gather(-1, segment)


class Planner:
    """Model-predictive control by random shooting: every --replan steps, score --samples
    piecewise-constant sequences plus the previous best one (shifted to now), and follow the best.
    A sequence's cost is the smallest predicted distance to the goal along it, relative to the
    current one, plus --time-cost per step taken to get there: a minimum, not a sum, so that a
    detour through the door is not outweighed by the steps spent walking away from the goal.
    With --remember-blocked (the default), a move after which the episode's observation did not change
    is never again the first action of a plan from that observation (positions stand for the
    observations, which they determine). With --keep-plan (the default) and the model's open-loop error
    (error: (H,), None for the true dynamics), the kept plan's cost is lowered by that error at its
    arrival, relative to the current distance.
    distances(pos, episodes, seq) → ((E, S, H) predicted distances to the goal after each action,
    (E,) the current distances)."""

    def __init__(self, distances, episodes, args, gen, error=None):
        self.distances, self.args, self.gen, self.error = distances, args, gen, error
        self.best = torch.zeros(episodes, args.horizon, dtype=torch.long)
        self.age = torch.full((episodes,), -1)  # steps since the last plan; −1: none yet
        # --remember-blocked: each episode's last position and action, and {position: blocked actions}
        self.last_pos, self.last_action = torch.zeros(episodes, 2), torch.full((episodes,), -1)
        self.blocked = [{} for _ in range(episodes)]

    def plan(self, pos, episodes):
        args = self.args
        # candidates: random sequences, the first replaced by the previous best plan, shifted to now
        seq = segment_sequences(len(pos), args.samples + 1, args.horizon, args.segments, self.gen)
        age = self.age[episodes]
        shift = (torch.arange(args.horizon) + age[:, None]).clamp(0, args.horizon - 1)
        seq[:, 0] = torch.where(age[:, None] >= 0, self.best[episodes].gather(1, shift), seq[:, 0])
        # cost: the best relative distance along each sequence, plus the steps taken to reach it
        predicted, current = self.distances(pos, episodes, seq)
        steps = torch.arange(1, args.horizon + 1, dtype=predicted.dtype)
        relative = predicted / current[:, None, None].clamp_min(1e-8)
        cost_by_step = relative + args.time_cost * steps                                  # (E, S, H)
        cost = cost_by_step.amin(-1)                                                      # (E, S)
        if args.keep_plan and self.error is not None:
            # the kept plan won as the least of many noisy costs; costed again from here it has lost that
            # luck, so a new sequence replaces it only if cheaper by more than the model's own error at
            # the kept plan's arrival, times --margin-scale (else, near the goal, a new lucky detour wins
            # every step)
            error = args.margin_scale * self.error.to(cost)
            margin = error[cost_by_step[:, 0].argmin(-1)] / current.clamp_min(1e-8)
            cost[:, 0] -= torch.where(age >= 0, margin, 0.0)
        if args.remember_blocked:  # no sequence starts with a move already seen blocked from here
            banned = torch.zeros(len(pos), 4, dtype=torch.bool)
            for row, (e, key) in enumerate(zip(episodes.tolist(), map(tuple, pos.tolist()))):
                banned[row, list(self.blocked[e].get(key, ()))] = True
            cost = cost.masked_fill(banned.gather(1, seq[:, :, 0]), math.inf)
        # keep the cheapest sequence; its first action is taken now
        self.best[episodes] = seq[torch.arange(len(pos)), cost.argmin(1)]
        self.age[episodes] = 0

    def __call__(self, pos, episodes):
        # plan again for the episodes with no plan yet or a plan --replan steps old
        due = (self.age[episodes] < 0) | (self.age[episodes] >= self.args.replan)
        if self.args.remember_blocked:
            # a move that left the observation as it was hit a wall the model did not foresee (at
            # 16 px, e.g. the door's edge, a fraction of a pixel away): remember it, and plan again
            stuck = (self.last_action[episodes] >= 0) & (pos == self.last_pos[episodes]).all(1)
            for e, key, action in zip(episodes[stuck].tolist(), map(tuple, pos[stuck].tolist()),
                                      self.last_action[episodes[stuck]].tolist()):
                self.blocked[e].setdefault(key, set()).add(action)
            due |= stuck
        if due.any():
            self.plan(pos[due], episodes[due])
        action = self.best[episodes, self.age[episodes]]
        self.age[episodes] += 1
        self.last_pos[episodes], self.last_action[episodes] = pos, action
        return action


def true_distances(goals):
    """The planner's ideal model: the true dynamics and the wall-blind distance of positions."""
    def distances(pos, episodes, seq):
        position, out = pos[:, None].expand(-1, seq.shape[1], -1), []
        for t in range(seq.shape[2]):
            position = tr.move(position, seq[:, :, t])
            out.append((position - goals[episodes, None]).norm(dim=-1))
        return torch.stack(out, -1), (pos - goals[episodes]).norm(dim=-1)
    return distances


def latent_distances(model, goals, regressor=None):
    """Distances ‖ẑ_t − z_goal‖ of the model's open-loop predictions to the goal image's embedding
    (of Pẑ_t, PEIRA's regression of the target embedding, when a regressor P is given)."""
    with torch.no_grad():
        goal_z = model.encode(tr.render(goals, model.res))

    @torch.no_grad()
    def distances(pos, episodes, seq):
        z0, goal = model.encode(tr.render(pos, model.res)), goal_z[episodes]
        return rollout_distances(model, z0, goal, seq, regressor), (z0 - goal).norm(dim=-1)
    return distances


MIN_ROWS = 16  # products of fewer rows take other CPU kernels, which round otherwise (measured: 1-11 rows)


@torch.no_grad()
def rollout_distances(model, z0, goal, seq, regressor=None):
    """Distances ‖ẑ_t − goal‖ (E, S, H) along the model's rollouts of the action sequences seq (E, S, H)
    from the embeddings z0 (E, D), keeping one distance per step instead of every predicted embedding.
    Each step is predicted once for the sequences that agree so far: while a sequence repeats its first
    action, its predictions are those of that action repeated from z0, shared by all the episode's
    sequences that start with it (a trunk, one per episode and action); from its first change on it has
    rows of its own. The same numbers as model.rollout of all the sequences in one batch (bitwise on the
    CPU of README's runs, given MIN_ROWS), with about 40% fewer predictions for the planner's
    piecewise-constant sequences."""
    n_episodes, n_samples, horizon = seq.shape
    n_actions, device = 4, seq.device
    n_trunks, t_index = n_actions * n_episodes, torch.arange(horizon, device=device)
    # each sequence's run: its steps before the first change of action (all H if none)
    flat = seq.flatten(0, 1)
    changed = flat != flat[:, :1]
    run = torch.where(changed.any(1), changed.int().argmax(1), horizon)
    # rows: the trunks (row 4e + a: episode e repeating action a), then the sequences by the length of their
    # run, so that those that have left their trunk by step t are the rows before in_use[t]
    order = run.argsort(stable=True)
    in_use = (n_trunks + torch.searchsorted(run[order], t_index, right=True)).tolist()
    trunk_actions = torch.arange(n_actions, device=device).repeat(n_episodes)[:, None].expand(-1, horizon)
    row_actions = torch.cat([trunk_actions, flat[order]])
    onehot = torch.nn.functional.one_hot(row_actions, n_actions).to(z0.dtype)
    row_trunk = torch.cat([torch.arange(n_trunks, device=device),  # a trunk is its own
                           order.div(n_samples, rounding_mode="floor") * n_actions + flat[order, 0]])
    row_run = torch.cat([run.new_full((n_trunks,), horizon), run[order]])
    row_goal = goal.repeat_interleave(n_actions, 0)[row_trunk]
    z = torch.cat([z0.repeat_interleave(n_actions, 0), z0.new_zeros(len(order), z0.shape[1])])
    out = z0.new_zeros(len(z), horizon)
    for t in range(horizon):
        # the sequences whose run ends at step t leave their trunk, from its embedding after t steps
        entering = slice(in_use[t - 1] if t else n_trunks, in_use[t])
        z[entering] = z[row_trunk[entering]]
        # rows past in_use[t] (padding up to MIN_ROWS) are overwritten when they enter, and their distances
        # before that are their trunk's
        rows = min(max(in_use[t], MIN_ROWS), len(z))
        z[:rows] = model.step(z[:rows], onehot[:rows, t])
        pred = z[:rows] if regressor is None else z[:rows] @ regressor.T
        out[:rows, t] = (pred - row_goal[:rows]).norm(dim=-1)
    # a sequence's distances: its trunk's up to its first change, then its own
    own = torch.where(t_index < row_run[:, None], out[row_trunk], out)[n_trunks:]
    return own[order.argsort()].reshape(n_episodes, n_samples, horizon)


ERROR_SEED = 99991  # held-out trajectories for the models' open-loop error: no training run draws this seed


@torch.no_grad()
def open_loop_error(model, horizon, regressor=None, door=(0.5, False), n=256):
    """RMS ‖ẑ_t − z_t‖ (of Pẑ_t with a regressor P) of the model's t-step open-loop predictions, t = 1 ..
    horizon, on n held-out trajectories drawn as its offline data were (door: their fraction guided
    through the door, and whether crossings were dropped): how far a rollout's distances can be
    trusted (the margin of --keep-plan)."""
    pos, actions = tr.random_trajectories(n, horizon, ERROR_SEED, *door)
    z = model.encode(tr.render(pos, model.res))
    pred = model.rollout(z[:, 0], actions)
    pred = pred if regressor is None else pred @ regressor.T
    return (pred - z[:, 1:]).square().sum(-1).mean(0).sqrt()


LATTICE = 32  # an episode's positions are start + STEP·(i, j), |i|, |j| ≤ LATTICE covers the arena


class DistanceField:
    """Exact number of steps to the goal from every reachable position of each episode (positions
    stay on the lattice start + STEP·(i, j)), by breadth-first relaxation on the true dynamics."""

    def __init__(self, starts, goals):
        offsets = torch.arange(-LATTICE, LATTICE + 1) * tr.STEP
        grid = starts[:, None, None] + torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1)
        self.starts, self.ok = starts, tr.free(grid)
        inf = torch.full(self.ok.shape, float("inf"))
        # D: steps to the goal, 0 at the cells that count as reached, relaxed until nothing changes
        D = torch.where(self.ok & ((grid - goals[:, None, None]).norm(dim=-1) < tr.SUCCESS_DIST), 0.0, inf)
        while True:
            best_neighbour = torch.stack([self.shift(D, m) for m in range(4)]).amin(0)
            new = torch.where(self.ok, torch.minimum(D, best_neighbour + 1), inf)
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


def steps_around(goal):
    """Every position of the lattice goal + STEP·(i, j), |i|, |j| ≤ LATTICE (it covers the arena), as a
    (2L+1, 2L+1, 2) grid in image order (row: y), and the true number of steps from each to the goal
    (inf in a wall or out of the arena)."""
    offsets = torch.arange(-LATTICE, LATTICE + 1) * tr.STEP
    grid = goal + torch.stack(torch.meshgrid(offsets, offsets, indexing="xy"), -1)
    return grid, DistanceField(goal[None], goal[None])(grid[None], torch.tensor([0]))[0]


STEP_BANDS = (0, 8, 16, 24, 32, 48)  # bands of true steps to the goal: [0, 8), [8, 16), ..., [48, ∞)
PROFILE_GOALS = 20  # goals (the first episodes') over which distance_profile averages


@torch.no_grad()
def distance_profile(embed, goals):
    """How far from a goal a model's latent distance still points the way; embed(positions (n, 2)) →
    embeddings (n, d). For each goal, over the positions x reachable on its lattice goal + STEP·(i, j)
    (the whole arena), the latent distance ‖z(x) − z_goal‖ against the steps x needs to come within
    SUCCESS_DIST of the goal. Returns: their Spearman correlation, averaged over the goals (a goal whose
    latent distances are all equal is left out), the same with the latent distances shuffled across
    positions (the null: about 0); the mean latent distance in each band of steps (STEP_BANDS: [0, 8),
    [8, 16), ..., [48, ∞)), averaged over the goals and divided by the largest of these band means; and
    the basin radius, the lower edge of the first band at 0.9 or more (None for a map without one, e.g.
    collapsed or non-finite embeddings): beyond it the map is about flat, and a planner's rollouts that
    end there see no slope to follow."""
    from scipy.stats import spearmanr
    gen = torch.Generator().manual_seed(0)
    rho, null, profiles = [], [], []
    for goal in goals:
        grid, steps = (t.transpose(0, 1).flatten(0, 1) for t in steps_around(goal))  # in (i, j) order
        grid, steps = grid[steps.isfinite()], steps[steps.isfinite()]  # free, reachable positions
        latent = (embed(grid) - embed(goal[None])).norm(dim=-1)
        rho.append(spearmanr(steps, latent).statistic)
        null.append(spearmanr(steps, latent[torch.randperm(len(latent), generator=gen)]).statistic)
        band = torch.bucketize(steps, torch.tensor(STEP_BANDS[1:], dtype=steps.dtype), right=True)
        profiles.append([latent[band == b].mean().item() if (band == b).any() else math.nan
                         for b in range(len(STEP_BANDS))])
    profile = torch.tensor(profiles).nanmean(0)
    profile = profile / profile.nan_to_num(0).max()
    radius = next((STEP_BANDS[b] for b in range(len(STEP_BANDS)) if profile[b] >= 0.9), None)
    rho, null = torch.tensor(rho).nanmean().item(), torch.tensor(null).nanmean().item()
    return {"spearman": rho, "spearman_shuffled": null, "basin_radius": radius, "profile": profile.tolist()}


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
        # the episodes still running
        active = (~done).nonzero().flatten()
        if not len(active):
            break
        # their actions, timed
        t0 = time.time()
        actions = policy(pos[active], active)
        seconds += time.time() - t0
        # move; an episode that reaches its goal stops there
        pos = pos.clone()
        pos[active] = tr.move(pos[active], actions)
        reached = ~done & ((pos - goals).norm(dim=1) < tr.SUCCESS_DIST)
        steps[reached] = t + 1
        done |= reached
        paths.append(pos.clone())
    return done, steps, torch.stack(paths, 1), seconds / max(len(paths) - 1, 1)


FAILURE_KINDS = ("came within 2 steps", "against a wall", "elsewhere")


def failure_kinds(success, paths, field):
    """Why the failed episodes failed, each counted once, in FAILURE_KINDS' order: the agent came
    within 2 steps of the goal (of counting as reached) and did not finish; it spent at least half of
    its last 40 moves pushing against a wall or the border (the move blocked, the position unchanged;
    for a model, a wall it believed passable, e.g. the door's edge, a fraction of a pixel away at 16
    px); or it failed elsewhere (wandering, or circling far from the goal). paths (E, T + 1, 2) from
    run_episodes."""
    failed = (~success).nonzero().flatten()
    if not len(failed):
        return dict.fromkeys(FAILURE_KINDS, 0)
    near = field(paths[failed], failed).amin(1) <= 2
    last = paths[failed, -41:]
    pushing = (last[:, 1:] == last[:, :-1]).all(-1).float().mean(1) >= 0.5
    counts = (int(near.sum()), int((pushing & ~near).sum()), int((~pushing & ~near).sum()))
    return dict(zip(FAILURE_KINDS, counts))


def wilson(k, n, z=1.96):
    """95% Wilson interval of a success rate."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def load_model(path):
    """(label, world model, PEIRA's regressor or None, its offline data's (door fraction, crossings
    dropped)) from a checkpoint of two_rooms.py; for any other file (foreign, damaged, from an older
    two_rooms.py) a one-line error naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):  # e.g. a tensor saved alone: ckpt["config"] would index it
            raise TypeError(f"holds a {type(ckpt).__name__}, not a checkpoint's dictionary")
        config = ckpt["config"]
        model = tr.WorldModel(config["res"], config["latent"], config["predictor"])
        model.load_state_dict(ckpt["model"])
        label, regressor, render = config["label"], ckpt["regressor"], config.get("render", 1)
        # the offline data's settings as two_rooms.py keys its cache (its defaults: before the flags existed)
        data = tr.data_config(argparse.Namespace(**{**vars(tr.parser.parse_args([])), **config}))
        door = (data["door_fraction"], data["no_door"])
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError, IndexError, TypeError,
            ValueError, AttributeError) as err:
        reason = (str(err).strip().splitlines() or [""])[0][:120]  # torch's messages run to paragraphs
        if isinstance(err, pickle.UnpicklingError):  # torch's first line is about its defaults
            reason = "not a torch.save file of tensors and plain values"
        raise SystemExit(f"{path} is not a world model of this two_rooms.py ({type(err).__name__}: "
                         f"{reason}); train one with `python two_rooms.py`") from None
    if render != tr.RENDER_VERSION:  # its encoder never saw the images it would be given
        raise SystemExit(f"{path} was trained on images rendered by an older two_rooms.py (version {render}, "
                         f"now {tr.RENDER_VERSION}); train it again with `python two_rooms.py`")
    return label, model.eval(), regressor, door


def load_models(spec):
    """{label: (world model, PEIRA's regressor or None, its data's door settings)} from a folder of
    <model>.pt or a list of files. Labels name the rows and seed their generators: two checkpoints with
    one label are refused."""
    paths = sorted(glob.glob(os.path.join(spec, "*.pt"))) if os.path.isdir(spec) else spec.split(",")
    paths = [path for path in paths if not os.path.basename(path).startswith("data_")]  # not the data cache
    if not paths or not all(os.path.isfile(path) for path in paths):
        raise SystemExit(f"no world models at {spec}: train them with `python two_rooms.py` first")
    models, sources = {}, {}
    for path in paths:
        label, model, regressor, door = load_model(path)
        if label in sources:
            raise SystemExit(f"{sources[label]} and {path} are both labelled {label}: plan them in separate "
                             "runs, or train them with different --seed (the label carries it)")
        models[label], sources[label] = (model, regressor, door), path
    return models


def figure(paths, starts, goals, out, res=64):
    """The paths of the first four episodes of every method, over the arena."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(paths), figsize=(3.2 * len(paths), 3.7))
    for ax, (name, path) in zip(axes, paths.items()):
        ax.imshow(tr.wall_image(res), cmap="Greys", extent=(0, tr.ARENA, tr.ARENA, 0))
        for e in range(min(4, len(starts))):
            ax.plot(path[e, :, 0], path[e, :, 1], lw=1.2, color=f"C{e}")
            ax.plot(*starts[e], "o", color=f"C{e}", ms=5)
            ax.plot(*goals[e], "*", color=f"C{e}", ms=10)
        ax.set_title(name, fontsize=10)
        ax.set(xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(os.path.join(out, "trajectories.png"), dpi=110)
    plt.close(fig)


@torch.no_grad()
def distance_maps(models, goal, out):
    """Why a model succeeds or fails: over the arena, the true number of steps to one goal, and each
    model's latent distance ‖z(x) − z_goal‖ to it. A map a planner can follow rises away from the goal
    along the path through the door; one that rises straight across the wall leads into the wall."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid, steps = steps_around(goal)
    ok = tr.free(grid)
    maps = {"true steps to the goal": steps}
    for name, (model, *_) in models.items():
        z = model.encode(tr.render(grid.reshape(-1, 2), model.res))
        z_goal = model.encode(tr.render(goal[None], model.res))
        maps[f"{name}: ‖z − z_goal‖"] = (z - z_goal).norm(dim=-1).reshape(ok.shape)
    fig, axes = plt.subplots(1, len(maps), figsize=(3.3 * len(maps), 3.4))
    extent = (grid[0, 0, 0] - 1, grid[0, -1, 0] + 1, grid[-1, 0, 1] + 1, grid[0, 0, 1] - 1)
    for ax, (title, m) in zip(axes, maps.items()):
        ax.imshow(torch.where(ok, m, float("nan")), extent=extent, cmap="viridis")
        walls = tr.wall_image(64)
        ax.imshow(walls, cmap="Greys", alpha=0.5 * walls.numpy(), extent=(0, tr.ARENA, tr.ARENA, 0))
        ax.plot(*goal, "r*", ms=10)
        ax.set(xlim=(0, tr.ARENA), ylim=(tr.ARENA, 0), xticks=[], yticks=[])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "distance_maps.png"), dpi=110)
    plt.close(fig)


def row_generator(seed, row):
    """A row's own random generator, seeded from (--seed, the row's name) by crc32 (stable across
    runs, unlike hash()): no row's draws depend on which rows ran before it."""
    return torch.Generator().manual_seed((seed % 2 ** 32) << 32 | zlib.crc32(row.encode()))


def by_objective(rows):
    """The model rows grouped over training seeds: {objective: {seed: success}}; a label's suffix
    -seed<s> names its seed (two_rooms.py --seed s), no suffix is seed 0."""
    groups = {}
    for row in rows:
        if not row["method"].endswith(" + planner"):
            continue
        label = row["method"][:-len(" + planner")]
        found = re.search(r"-seed(\d+)$", label)
        objective, seed = (label[:found.start()], int(found.group(1))) if found else (label, 0)
        groups.setdefault(objective, {})[seed] = row["success"]
    return groups


def paired_difference(a, b):
    """The success of a minus that of b, seed by seed over the training seeds both have (the same
    start/goal pairs), averaged, with a 95% t interval (n − 1 degrees of freedom; NaN bounds below 2
    seeds)."""
    from scipy.stats import t as student
    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if len(d) < 2:
        return (sum(d) / len(d) if d else math.nan), math.nan, math.nan
    mean = sum(d) / len(d)
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    half = student.ppf(0.975, len(d) - 1) * std / math.sqrt(len(d))
    return mean, mean - half, mean + half


def print_seed_summary(groups):
    """Success by objective over training seeds (mean ± std), and PEIRA's success minus each other
    objective's, seed by seed (paired_difference), when some objective has two seeds or more."""
    if not groups or max(len(seeds) for seeds in groups.values()) < 2:
        return
    print("\n| objective | training seeds | success, mean ± std over seeds |\n|---|---|---|")
    for objective, seeds in groups.items():
        values = list(seeds.values())
        mean = sum(values) / len(values)
        spread = sum((v - mean) ** 2 for v in values)
        std = math.sqrt(spread / (len(values) - 1)) if len(values) > 1 else math.nan
        print(f"| {objective} | {','.join(map(str, sorted(seeds)))} | {100 * mean:.1f} ± {100 * std:.1f}% |")
    if "peira" in groups and len(groups) > 1:  # no table without another objective to pair with
        print("\n| paired difference over seeds | points (95% interval) |\n|---|---|")
        for objective, seeds in groups.items():
            if objective != "peira":
                mean, lo, hi = paired_difference(groups["peira"], seeds)
                print(f"| peira − {objective} | {100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")


PER_OBJECTIVE = ("margin_scale",)  # planner settings tuned for each objective alike on the validation pairs


def summarise(paths):
    """Success over training seeds (print_seed_summary) from the rows that separate runs of plan.py
    wrote into their plan.json files: rows are independent of each other (each its own generator), so
    rows of runs with the same pairs and planner settings can be put side by side (settings tuned for
    each objective, PER_OBJECTIVE, may differ: each file's are printed); a row of a later file replaces
    an earlier one of the same name."""
    rows, settings, sources = {}, None, []
    # a flag newer than a file: its run did what plan.py did before the flag existed
    defaults = {**vars(parser.parse_args([])), **BEFORE_FLAG}
    for path in paths:
        try:
            with open(path) as fh:
                saved = json.load(fh)
            config = {**defaults, **saved["config"]}
            tuned = ", ".join(f"--{k.replace('_', '-')} {config[k]:g}" for k in PER_OBJECTIVE)
            unshared = ("models", "out", "summary", *PER_OBJECTIVE)
            config = {k: v for k, v in config.items() if k not in unshared}
            planned = saved["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"{path} is not a plan.json of plan.py ({type(err).__name__}: {err})") from None
        if settings is not None and config != settings:
            raise SystemExit(f"{path} was planned with other settings than {paths[0]}: "
                             f"{ {k: v for k, v in config.items() if settings.get(k) != v} }")
        settings = config
        sources.append(f"{path} ({tuned})")
        rows.update({row["method"]: row for row in planned})
    print(f"Rows of {', '.join(sources)} ({settings['episodes']} episodes, start/goal seed "
          f"{settings['seed']})")
    print_seed_summary(by_objective(rows.values()))
    return list(rows.values())


def main(argv=None):
    args = parser.parse_args(argv)
    if args.summary:
        return summarise(args.summary.split(","))
    if min(args.horizon, args.episodes, args.samples, args.segments, args.replan) < 1:
        parser.error("need --horizon, --episodes, --samples, --segments, --replan ≥ 1")
    if not 0 <= args.time_cost < math.inf:  # nan fails too
        parser.error(f"need a finite --time-cost ≥ 0, got {args.time_cost}")
    if not 0 <= args.margin_scale < math.inf:
        parser.error(f"need a finite --margin-scale ≥ 0, got {args.margin_scale}")
    if args.margin_scale != 1 and not args.keep_plan:
        parser.error("--margin-scale scales --keep-plan's margin: it does nothing with --no-keep-plan")
    if not args.replan <= args.horizon:
        parser.error("need --replan ≤ --horizon")
    models = load_models(args.models)
    if args.cost == "regressed":  # only PEIRA's checkpoints with pooled moments hold a regressor P
        plain = [name for name, (_, regressor, _) in models.items() if regressor is None]
        if len(plain) == len(models):
            parser.error(f"--cost regressed needs a PEIRA model with pooled moments (two_rooms.py --moments "
                         f"pooled), which saves its regressor P; {args.models} has none")
        if plain:
            print(f"warning: --cost regressed applies to PEIRA's models with pooled moments only; "
                  f"{', '.join(plain)} planned with ‖ẑ − z_goal‖")
    os.makedirs(args.out, exist_ok=True)
    starts, goals = tr.start_goal_pairs(args.episodes, args.seed)

    # the policies: references first, then the planner on each model; each row its own generator
    field = DistanceField(starts, goals)
    random_gen = row_generator(args.seed, "random")
    policies = {"oracle (shortest path)": lambda pos, episodes: oracle_action(field, pos, episodes),
                "random": lambda pos, episodes: torch.randint(0, 4, (len(pos),), generator=random_gen)}
    row = "true dynamics + planner, position cost"
    policies[row] = Planner(true_distances(goals), len(goals), args, row_generator(args.seed, row))
    errors = {}
    for name, (model, regressor, door) in models.items():
        regressor = regressor if args.cost == "regressed" else None
        error = open_loop_error(model, args.horizon, regressor, door) if args.keep_plan else None
        errors[name] = error
        row = f"{name} + planner"
        policies[row] = Planner(latent_distances(model, goals, regressor), len(goals), args,
                                row_generator(args.seed, row), error)

    # every policy on the same start/goal pairs
    rows, paths = [], {}
    true_steps = field(starts, torch.arange(len(starts)))  # each pair's shortest path, in steps
    cuts = true_steps.quantile(torch.tensor([1 / 3, 2 / 3]), interpolation="lower")
    third = torch.bucketize(true_steps, cuts)  # the pairs in thirds by length: ≤ cut 1, ≤ cut 2, longer
    cuts = cuts.tolist()
    for name, policy in tqdm(policies.items(), desc="methods", leave=False):
        success, steps, path, per_step = run_episodes(policy, starts, goals)
        successes = int(success.sum())
        lo, hi = wilson(successes, args.episodes)
        rows.append({"method": name, "success": successes / args.episodes, "ci95": [lo, hi],
                     "mean_steps": steps[success].float().mean().item() if successes else None,
                     "plan_ms_per_step": 1e3 * per_step,
                     "success_by_length": [success[third == i].float().mean().item() if (third == i).any()
                                           else None for i in range(3)],
                     "failures": failure_kinds(success, path, field)})
        paths[name] = path
    for name, (model, *_) in models.items():  # how far each model's latent distance points the way
        embed = lambda pos, model=model: model.encode(tr.render(pos, model.res))  # noqa: E731
        row = next(row for row in rows if row["method"] == f"{name} + planner")
        row["distance_profile"] = distance_profile(embed, goals[:PROFILE_GOALS])
        if errors[name] is not None:  # the margin of --keep-plan, after each step of a plan
            row["open_loop_error"] = errors[name].tolist()

    # the table, plan.json and the figures
    print(f"\nTwo Rooms, {args.episodes} episodes (start/goal seed {args.seed}), success within "
          f"{tr.SUCCESS_DIST} units in {tr.MAX_STEPS} steps\n")
    print("| method | success | 95% CI | mean steps (successes) | planning ms/step |\n|---|---|---|---|---|")
    for row in rows:
        steps = "—" if row["mean_steps"] is None else f"{row['mean_steps']:.0f}"
        lo, hi = (100 * x for x in row["ci95"])
        print(f"| {row['method']} | {100 * row['success']:.0f}% | {lo:.0f}–{hi:.0f}% | "
              f"{steps} | {row['plan_ms_per_step']:.1f} |")
    lengths = [f"≤ {cuts[0]:.0f}", f"{cuts[0] + 1:.0f}–{cuts[1]:.0f}", f"> {cuts[1]:.0f}"]
    lengths = [f"{label} ({int((third == i).sum())} pairs)" for i, label in enumerate(lengths)]
    print(f"\n| method | success, shortest path {' | '.join(lengths)} steps |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | " + " | ".join("—" if s is None else f"{100 * s:.0f}%"
                                                   for s in row["success_by_length"]) + " |")
    print(f"\n| method | failures | {' | '.join(FAILURE_KINDS)} |\n|---|---|---|---|---|")
    for row in rows:
        counts = row["failures"].values()
        print(f"| {row['method']} | {sum(counts)} | " + " | ".join(str(n) for n in counts) + " |")
    bands = [f"{a}–{b - 1}" for a, b in zip(STEP_BANDS, STEP_BANDS[1:])] + [f"≥ {STEP_BANDS[-1]}"]
    print(f"\nLatent distance ‖z(x) − z_goal‖ against true steps from x to the goal, over the arena, "
          f"{min(PROFILE_GOALS, len(goals))} goals; its mean by band of true steps, as a fraction of the "
          "largest"
          f"\n\n| model | Spearman ρ (shuffled) | basin radius (steps) | {' | '.join(bands)} |"
          "\n|---|---|---|" + "---|" * len(bands))
    for row in rows:
        if "distance_profile" in row:
            p, name = row["distance_profile"], row["method"][:-len(" + planner")]
            radius = "—" if p["basin_radius"] is None else p["basin_radius"]
            print(f"| {name} | {p['spearman']:.2f} ({p['spearman_shuffled']:+.2f}) | {radius} | "
                  + " | ".join(f"{x:.2f}" for x in p["profile"]) + " |")
    if args.keep_plan and errors:
        at = sorted({1, min(16, args.horizon), args.horizon})
        print("\nOpen-loop error of each model: RMS ‖ẑ_t − z_t‖ on held-out trajectories (the margin of "
              f"--keep-plan)\n\n| model | {' | '.join(f'{t} steps' for t in at)} |\n|---|" + "---|" * len(at))
        for name, error in errors.items():
            print(f"| {name} | " + " | ".join(f"{error[t - 1]:.2f}" for t in at) + " |")
    print_seed_summary(by_objective(rows))
    with open(os.path.join(args.out, "plan.json"), "w") as fh:
        json.dump({"config": vars(args), "rows": rows}, fh, indent=1)
    figure(paths, starts, goals, args.out)
    distance_maps(models, goals[0], args.out)
    return rows


if __name__ == "__main__":
    main()
