"""Self-supervised ResNet-50 on ImageNet-1k with PEIRA, one GPU to many nodes (torchrun).

    torchrun --standalone --nproc_per_node=8 train_imagenet.py --data /path/to/imagenet
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
        train_imagenet.py --data /path/to/imagenet            # 32 GPUs, same global batch 2048
    python train_imagenet.py --data /path/to/imagenet --accum-steps 8   # one GPU, 8 micro-batches
    python train_imagenet.py --data /path/to/imagenet --eval out/imagenet/ckpt.pt   # linear probe

--data holds ImageFolder train/ and val/ with the same class folders (one per class). Losses
(--loss): peira (running moments, η annealed), vicreg (25 / 25 / 1, global-batch statistics). Each
loss runs its own recipe unless flags override it (RECIPES). peira: the recipe of the PEIRA
preprint (arXiv:2605.17671), λ 0.1, η 0.9 → 0.5, global batch 2048, LARS lr 2.4, 10 warmup epochs,
cosine to 2e-3, wd 1e-6, clipping 1.0, projector 8192-8192-256. vicreg: VICReg's, LARS lr 0.2 ·
batch / 256, cosine to 0.001 of it, wd 1e-6, projector 8192-8192-8192, no clipping. Both: 100
epochs, bf16 autocast, SyncBatchNorm. Every epoch: online linear probe on val/, the PEIRA
objective and diagnostics of the embeddings (for both losses), a checkpoint (the previous one is
kept as ckpt.pt.prev). Writes into --out: config.json, metrics.jsonl, ckpt.pt.

A run restarted with the same --out resumes from its last checkpoint (preemption) when the
configuration matches; the data order and every augmentation are functions of (seed, epoch, image
index), so a resumed run continues exactly and ranks never share augmentations. With
--accum-steps a > 1 each micro-batch of a PEIRA step uses η_micro = 1 − (1 − η)^(1/a), so the
moments decay over an optimiser step as they would with the whole batch; VICReg's accumulation is
exact up to batch-norm statistics, which are per micro-batch (train_step).
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.distributed.nn.functional import all_gather as all_gather_with_grad
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from tqdm import tqdm

import peira

# -----------------------------------------------------------------------------
# hyperparameters: per-loss recipes, flags override them

parser = argparse.ArgumentParser(description="PEIRA on ImageNet-1k",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
RECIPE = "default: the --loss recipe"
parser.add_argument("--data", required=True, help="ImageFolder root holding train/ and val/")
parser.add_argument("--out", default="out/imagenet", help="output folder (a checkpoint there is resumed)")
parser.add_argument("--loss", default="peira", choices=["peira", "vicreg"])
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=2048, help="global batch per optimiser step")
parser.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimiser step and rank")
parser.add_argument("--lr", type=float, help="peak LARS learning rate; " + RECIPE)
parser.add_argument("--lars", default="vicreg", choices=["vicreg", "solo-learn"],
                    help="LARS's trust-ratio convention, named after the code it comes from (see LARS)")
parser.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine; " + RECIPE)
parser.add_argument("--wd", type=float, help=RECIPE)
parser.add_argument("--warmup-epochs", type=float, help=RECIPE)
parser.add_argument("--clip", type=float, help="gradient-norm clipping (0: off); " + RECIPE)
parser.add_argument("--lam", type=float, default=0.1)
parser.add_argument("--eta-start", type=float, default=0.9)
parser.add_argument("--eta-end", type=float, default=0.5)
parser.add_argument("--vicreg-coeffs", metavar="A,B,C",
                    help="VICReg's invariance, variance and covariance coefficients (default: its paper's "
                         "25,25,1)")
parser.add_argument("--proj", help="projector widths, last = embedding dim k; " + RECIPE)
parser.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
                    help="the last batch norm of each residual block starts at 0, so that each block starts "
                         "as its shortcut (as SimSiam's and VICReg's code)")
parser.add_argument("--image-size", type=int, default=224, help="crop size (small values for tests)")
parser.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1),
                    help="loader workers per rank")
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--allow-change", default="", metavar="KEYS",
                    help="comma-separated settings that may differ from the checkpoint's when resuming, "
                         "e.g. epochs (the change is logged)")
parser.add_argument("--stop-after", type=int, default=0,
                    help="exit after this many epochs of this run (0: run to --epochs)")
parser.add_argument("--eval", metavar="CKPT", help="offline linear probe of a checkpoint, then exit")
parser.add_argument("--probe-epochs", type=int, default=100)
parser.add_argument("--probe-lr", type=float, default=0.25)
parser.add_argument("--probe-batch", type=int, default=1024)
parser.add_argument("--seed", type=int, default=0)

RECIPES = {
    # the PEIRA preprint's ImageNet recipe (arXiv:2605.17671)
    "peira": dict(lr=2.4, min_lr=2e-3, wd=1e-6, warmup_epochs=10, clip=1.0, proj="8192-8192-256"),
    # VICReg's (A. Bardes, J. Ponce and Y. LeCun, "VICReg: Variance-Invariance-Covariance
    # Regularization for Self-Supervised Learning", ICLR 2022, arXiv:2105.04906, and its reference
    # code): LARS, lr 0.2 · batch / 256, 10 warmup epochs, cosine to 0.001 of the peak, wd 1e-6,
    # projector 8192-8192-8192, no clipping
    "vicreg": dict(lr_per_256=0.2, min_lr_ratio=1e-3, wd=1e-6, warmup_epochs=10, clip=0.0,
                   proj="8192-8192-8192"),
}
# settings added after checkpoints were written, with their earlier value (check_resume)
ADDED_SETTINGS = {"zero_init_residual": False, "vicreg_coeffs": None}
VICREG_COEFFS = (25.0, 25.0, 1.0)  # invariance, variance, covariance (official VICReg)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# =============================================================================
# shared by train_cifar.py and train_imagenet.py: the two copies are identical (tested)

def setup_distributed():
    """(rank, world size, device); torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. On a GPU cuDNN
    times its convolution algorithms once and keeps the fastest (the training shapes are fixed)."""
    torch.backends.cudnn.benchmark = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def gather_with_grad(z, world):
    """The global batch (rows ordered by rank). Backward hands each rank the gradient of its rows
    summed over the ranks; as every rank computes the same global term, DDP's average of the
    parameter gradients is then the gradient of the global batch."""
    return torch.cat(all_gather_with_grad(z.contiguous())) if world > 1 else z


def vicreg_loss(z1, z2, world, coeffs=VICREG_COEFFS):
    """VICReg (Bardes, Ponce & LeCun, ICLR 2022), coefficients (invariance, variance, covariance),
    its paper's 25 / 25 / 1 by default: invariance on the local batch (DDP averages it), variance and
    covariance on the global batch."""
    z1, z2 = z1.float(), z2.float()
    inv = F.mse_loss(z1, z2)
    z1, z2 = gather_with_grad(z1, world), gather_with_grad(z2, world)
    n, d = z1.shape
    var = cov = 0
    for zz in (z1, z2):
        zz = zz - zz.mean(0)
        var = var + F.relu(1 - torch.sqrt(zz.var(0) + 1e-4)).mean() / 2
        c = zz.T @ zz / (n - 1)
        cov = cov + (c.square().sum() - c.diagonal().square().sum()) / d
    a, b, g = coeffs
    return a * inv + b * var + g * cov


def simsiam_loss(z1, z2, p1, p2):
    """SimSiam (Chen & He, CVPR 2021): symmetric negative cosine, stop-gradient on the targets. In
    float32: CPU bf16 autocast keeps cosine_similarity in bf16 (CUDA's casts it to float32), whose
    8-bit mantissa rounds away the small differences between the views that the gradient lives on."""
    z1, z2, p1, p2 = z1.float(), z2.float(), p1.float(), p2.float()
    return -0.5 * (F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean())


def peira_direct_loss(z1, z2, lam, world):
    """PEIRA's exact objective on the moments of the global batch, back-propagated through the
    inverse (the "direct" algorithm): the same value, hence the same bias, on any number of GPUs."""
    return peira.peira_objective(gather_with_grad(z1, world), gather_with_grad(z2, world), lam)


def ssl_loss(name, z1, z2, p1, p2, peira_loss, lam, world, vicreg_coeffs=VICREG_COEFFS):
    if name == "peira":
        return peira_loss(z1, z2)  # running moments, all-reduced inside
    if name == "peira_direct":
        return peira_direct_loss(z1, z2, lam, world)
    if name == "simsiam":
        return simsiam_loss(z1, z2, p1, p2)
    return vicreg_loss(z1, z2, world, vicreg_coeffs)


LARS_CONVENTIONS = ("vicreg", "solo-learn")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio q: the step is lr · q · (g + wd·p), momentum on
    it; parameters with ndim ≤ 1 (biases, norms) get neither weight decay nor the trust ratio. Two
    conventions, which differ by up to 500× at a small lr:
      vicreg      q = 0.001 ‖p‖ / ‖g + wd·p‖ (VICReg's official code: the trust multiplies lr);
      solo-learn  q = min(0.02 ‖p‖ / (‖g‖ + wd‖p‖) / lr, 1) (solo-learn's, from Lightning Bolts, with
                  its configs' eta 0.02 and clip_lars_lr: a layer moves by at most lr · ‖g + wd·p‖).
    A zero norm gives the plain step (g + wd·p for vicreg, g for solo-learn, as their codes do). The
    step runs on all the parameters of a group at once (torch._foreach_*): a few kernels instead of
    several per parameter, which on a GPU would otherwise each wait on Python."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, convention="vicreg"):
        if convention not in LARS_CONVENTIONS:
            raise ValueError(f"LARS convention must be one of {LARS_CONVENTIONS}, got {convention!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, convention=convention)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            steps = [p.grad for p in params]  # biases and norms: the gradient as it is
            layers = [i for i, p in enumerate(params) if p.ndim > 1]
            if layers:
                weights, grads = [params[i] for i in layers], [steps[i] for i in layers]
                wd = g["weight_decay"]
                p_norm, g_norm = (torch.stack(torch._foreach_norm(t)) for t in (weights, grads))
                if g["convention"] == "vicreg":
                    decayed = torch._foreach_add(grads, weights, alpha=wd)
                    d_norm = torch.stack(torch._foreach_norm(decayed))
                    q = torch.where((p_norm > 0) & (d_norm > 0), 0.001 * p_norm / d_norm, 1.0)
                    torch._foreach_mul_(decayed, q.unbind())
                else:  # solo-learn: a zero norm gives the gradient alone
                    ok = (p_norm > 0) & (g_norm > 0)
                    q = (0.02 * p_norm / (g_norm + wd * p_norm + 1e-8) / g["lr"]).clamp(max=1.0)
                    # g + wd·p where both norms are nonzero, else g alone; then the trust ratio
                    decayed = torch._foreach_mul(weights, (wd * ok.to(q.dtype)).unbind())
                    torch._foreach_add_(decayed, grads)
                    torch._foreach_mul_(decayed, torch.where(ok, q, 1.0).unbind())
                for i, d in zip(layers, decayed):
                    steps[i] = d
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            bufs = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, steps)
            torch._foreach_add_(params, bufs, alpha=-g["lr"])


def learning_rate(step, total, warmup, peak, floor=0.0):
    """Linear warmup, then cosine from peak to floor: a function of the step, so resume is exact."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def mlp(dims, last_bn):
    """Linear-BN-ReLU layers, then a last Linear (followed by a BN without affine if last_bn)."""
    layers = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def average_gradients(module, world):
    """Mean of a module's gradients over the ranks: the online probe lives outside DDP."""
    if world > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def train_step(forward, ddp, model, probe, peira_loss, opts, batch, loss_name, lam, eta, accum, clip,
               world, autocast, vicreg_coeffs=VICREG_COEFFS):
    """Forward and backward of one optimiser step, then the step; returns the loss value.

    forward(x1, x2) -> (h1, z1, z2, p1, p2), each view goes through the network in its own
    forward (batch-norm statistics per view). With accum > 1 the images j, j + a, j + 2a, ...
    form micro-batch j. SimSiam's loss is a mean over images: accumulation is exact. VICReg and
    peira_direct depend on batch statistics: a pass without gradient gives the embeddings of the
    whole batch and the gradient G of its loss, then each micro-batch back-propagates its rows of
    G (exact up to batch-norm statistics, which are per micro-batch; one extra forward; batch-norm
    buffers restored after the first pass). PEIRA: each
    micro-batch is a PEIRA step with η_micro = 1 − (1 − η)^(1/a), so the running moments decay
    over the optimiser step as with the whole batch (an approximation: P, Q change between
    micro-batches). The PEIRA monitor takes in every other loss's embeddings (moments only, each
    rank its own: all_reduce_moments() before reading it). Returns the loss value (the
    mean over the ranks: a non-finite loss on one rank stops every rank at the same step, before
    the probe's all-reduce) and the last micro-batch's embeddings of view 1 (detached)."""
    x1, x2, y = batch
    opt, probe_opt = opts  # probe None: no online probe in the step (train_cifar.py fits it per epoch)
    opt.zero_grad(set_to_none=True)
    if probe is not None:
        probe_opt.zero_grad(set_to_none=True)
    parts = [slice(j, None, accum) for j in range(accum)]
    eta_micro = eta if accum == 1 else 1 - (1 - eta) ** (1 / accum)
    total = 0.0
    two_pass = accum > 1 and loss_name in ("vicreg", "peira_direct")
    if two_pass:
        buffers = [b.clone() for b in model.buffers()]
        with torch.no_grad(), autocast:
            outs = [forward(x1[s], x2[s]) for s in parts]
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
        z1 = torch.cat([o[1] for o in outs]).float().requires_grad_()
        z2 = torch.cat([o[2] for o in outs]).float().requires_grad_()
        loss = ssl_loss(loss_name, z1, z2, None, None, peira_loss, lam, world, vicreg_coeffs)
        g1, g2 = (g.split([len(o[1]) for o in outs]) for g in torch.autograd.grad(loss, (z1, z2)))
        peira_loss.eta = eta
        peira_loss.update(z1.detach(), z2.detach(), all_reduce=False)  # the monitor: moments only
        total = loss.detach()
    for j, s in enumerate(parts):
        sync = ddp.no_sync() if ddp is not None and j < accum - 1 else nullcontext()
        with sync, autocast:
            h1, z1, z2, p1, p2 = forward(x1[s], x2[s])
            probe_loss = 0.0 if probe is None else F.cross_entropy(probe(h1.detach().float()), y[s])
            if two_pass:  # the gradient of the whole batch's loss w.r.t. these rows
                loss = (g1[j] * z1.float()).sum() + (g2[j] * z2.float()).sum()
            else:
                peira_loss.eta = eta_micro
                loss = ssl_loss(loss_name, z1, z2, p1, p2, peira_loss, lam, world, vicreg_coeffs)
                total = total + loss.detach() / accum
                if loss_name != "peira":  # the monitor: moments only, all-reduced at logging time
                    peira_loss.update(z1.detach(), z2.detach(), all_reduce=False)
        (loss * (1.0 if two_pass else 1.0 / accum) + probe_loss / accum).backward()
    total = torch.as_tensor(total, dtype=torch.float32, device=z1.device).reshape(1)
    if world > 1:  # every rank sees the same value, so all stop or all go on to the collectives below
        dist.all_reduce(total)
        total /= world
    loss_value, z1 = float(total), z1.detach()
    if not math.isfinite(loss_value):
        return loss_value, z1  # nothing is updated on any rank; the caller stops, naming the checkpoint
    if clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if probe is not None:
        average_gradients(probe, world)
        probe_opt.step()
    return loss_value, z1


def check_replicas(tensors, world, what):
    """Stop when a rank holds non-finite values (FloatingPointError, on every rank) or when the
    ranks hold different values (a missing gradient all-reduce shows here): per tensor, the float64
    sum and sum of squares must agree exactly across ranks."""
    bad = sum(int(not t.detach().isfinite().all()) for t in tensors)
    rank = dist.get_rank() if world > 1 else 0
    flags = torch.zeros(world, dtype=torch.float64, device=tensors[0].device)
    flags[rank] = bad
    if world > 1:  # collective before any raise: no rank is left waiting
        dist.all_reduce(flags)
    if flags.any():
        where = ", ".join(f"rank {r}: {int(n)}" for r, n in enumerate(flags.tolist()) if n)
        raise FloatingPointError(f"non-finite {what} (tensors with NaN or inf per rank: {where} of "
                                 f"{len(tensors)})")
    if world == 1:
        return
    sums = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                        for t in tensors])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        differ = int((lo != hi).any(1).sum())
        raise RuntimeError(f"{what} differ across ranks ({differ} of {len(sums)} tensors)")


# the settings that do not change a run: everything else must match the checkpoint's to resume
NOT_RUN_KEYS = {"data", "out", "workers", "resume", "stop_after", "eval", "probe_epochs", "probe_lr",
                "probe_batch", "compile", "allow_change", "tiny", "view_corr_every"}
CHECKPOINT_KEYS = ("model", "probe", "peira", "opt", "probe_opt", "epoch", "config")


def with_added_settings(saved, now):
    """A saved configuration with the settings added to the script since it was written, for those this
    run has, at the value every earlier run had (ADDED_SETTINGS)."""
    return {**{k: v for k, v in ADDED_SETTINGS.items() if k in now}, **saved}


def check_resume(saved, now, allowed):
    """Compare the checkpoint's configuration with this run's. A key that changes the run (loss,
    epochs, batch size, projector, world size, ...) must match unless named in --allow-change;
    returns the allowed changes as lines for the log."""
    saved = with_added_settings(saved, now)
    keys = sorted((set(saved) | set(now)) - NOT_RUN_KEYS)
    diff = {k: (saved.get(k, "absent"), now.get(k, "absent")) for k in keys if saved.get(k) != now.get(k)}
    refused = [k for k in diff if k not in allowed]
    if refused:
        sys.exit("cannot resume: the checkpoint's run differs in\n"
                 + "\n".join(f"  {k}: checkpoint {diff[k][0]!r}, now {diff[k][1]!r}" for k in refused)
                 + "\nrepeat the checkpoint's settings, or allow a deliberate change with --allow-change "
                 + ",".join(refused))
    return [f"{k} changed from {a!r} to {b!r} (--allow-change)" for k, (a, b) in diff.items()]


def save_checkpoint(path, state):
    """Atomic save that keeps the previous checkpoint as path.prev; non-finite weights are never
    saved (FloatingPointError, the files on disk stay as they were). The new file is written and
    synced as path.tmp before the rotation path -> path.prev, tmp -> path: a crash at any moment
    leaves a readable path or path.prev (load_checkpoint moves a damaged path aside, so a damaged
    file never replaces a good path.prev)."""
    bad = [f"{part}.{name}" for part, sd in state.items() if isinstance(sd, dict) for name, t in sd.items()
           if torch.is_tensor(t) and t.is_floating_point() and not t.isfinite().all()]
    if bad:
        more = " ..." if len(bad) > 4 else ""
        raise FloatingPointError(f"non-finite values in {', '.join(bad[:4])}{more}: not saved; "
                                 f"the last good checkpoint is {path}")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    if os.path.exists(path):
        os.replace(path, path + ".prev")
    os.replace(tmp, path)


def read_checkpoint(path):
    """torch.load(weights_only=True) with one clear error for a missing, corrupt or truncated file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        return state
    except Exception as e:  # unpickling errors of a damaged file come in many types
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def load_checkpoint(path, rank=0):
    """The newest readable checkpoint of path and path.prev, or None when neither exists. A
    damaged path is reported, the previous good one is used, and rank 0 moves the damaged file
    to path.bad, so that the next save keeps the good one as path.prev."""
    errors = []
    for candidate in (path, path + ".prev"):
        if os.path.exists(candidate):
            try:
                state = read_checkpoint(candidate)
            except ValueError as e:
                errors.append(str(e))
                print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr)
                continue
            if errors:
                print(f"resuming from the previous checkpoint {candidate} (epoch {state['epoch']})",
                      file=sys.stderr)
                if rank == 0 and os.path.exists(path):  # other ranks that still read it fall back too
                    os.replace(path, path + ".bad")
                    print(f"the damaged checkpoint is kept as {path}.bad", file=sys.stderr)
            return state
    if errors:
        sys.exit("no readable checkpoint: " + "; ".join(errors))
    return None


def metrics_records(path, upto_epoch=None):
    """The records of metrics.jsonl; with upto_epoch, the file is cut to the epochs ≤ upto_epoch
    (a resumed run rewrites whatever came after its checkpoint)."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    if upto_epoch is not None:
        records = [r for r in records if r["epoch"] <= upto_epoch]
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    return records

def prepare_out(args, config, ckpt, metrics_path):
    """Rank 0's --out before training: metrics.jsonl started anew, or cut back to the checkpoint's
    epoch when resuming (the records after it belong to a lost or cut-off epoch); config.json."""
    os.makedirs(args.out, exist_ok=True)
    if ckpt is None:
        open(metrics_path, "w").close()
    else:
        metrics_records(metrics_path, upto_epoch=ckpt["epoch"])
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)


def restore(ckpt, states):
    """Load each object of states {checkpoint key: object} from ckpt; returns the epoch to start
    from (0 without a checkpoint)."""
    if ckpt is None:
        return 0
    for name, obj in states.items():
        obj.load_state_dict(ckpt[name])
    return ckpt["epoch"]


def wrap_for_training(model, args, world, device):
    """(ddp, forward, autocast): DDP when distributed, torch.compile with --compile, bf16 autocast
    with --bf16 (moments and solves stay in float32 inside peira.py)."""
    ddp = None
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    forward = torch.compile(ddp or model) if args.compile else (ddp or model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    return ddp, forward, autocast


def vicreg_coefficients(text):
    """--vicreg-coeffs "a,b,c" as VICReg's (invariance, variance, covariance); None: its paper's."""
    if text is None:
        return VICREG_COEFFS
    try:
        coeffs = tuple(float(c) for c in text.split(","))
        assert len(coeffs) == 3 and all(math.isfinite(c) and c >= 0 for c in coeffs) and any(coeffs)
    except (ValueError, AssertionError):
        raise ValueError(f"--vicreg-coeffs takes three numbers ≥ 0, e.g. 25,25,1 (got {text!r})") from None
    return coeffs


def setting_problems(args):
    """(problems, projector widths) for the settings both scripts check alike: λ, η, the names in
    --allow-change, --vicreg-coeffs, --proj; the caller adds its own and reports them all in one parser
    error."""
    problems = []
    if not args.lam > 0:
        problems.append(f"--lam must be > 0 (got {args.lam})")
    if not (0 < args.eta_end <= 1 and 0 < args.eta_start <= 1):
        problems.append("--eta-start and --eta-end must be in (0, 1]")
    unknown = [k for k in args.allow_change.split(",") if k and k not in vars(args) and k != "world_size"]
    if unknown:
        problems.append(f"--allow-change: unknown settings {', '.join(unknown)}")
    if args.vicreg_coeffs is not None:
        if args.loss != "vicreg":
            problems.append(f"--vicreg-coeffs: --loss {args.loss} is not VICReg")
        try:
            vicreg_coefficients(args.vicreg_coeffs)
        except ValueError as e:
            problems.append(str(e))
    proj = None
    try:
        proj = [int(d) for d in args.proj.split("-")]
        assert all(d > 0 for d in proj)
    except (ValueError, AssertionError):
        problems.append(f"--proj must be widths like 2048-2048-1024 (got {args.proj!r})")
    return problems, proj


# end of the code shared by train_cifar.py and train_imagenet.py
# =============================================================================


# -----------------------------------------------------------------------------
# data: ImageFolder, the asymmetric two-view recipe of BYOL and VICReg

def _has_image(folder):
    """Whether folder (or a sub-folder) holds a file ImageFolder loads; stops at the first one."""
    subfolders = []
    for entry in os.scandir(folder):
        if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS):
            return True
        if entry.is_dir():
            subfolders.append(entry.path)
    return any(_has_image(f) for f in subfolders)


def class_folders(path):
    """The class folders of one split, sorted as ImageFolder numbers them; exits with one
    message on a missing split, hidden folders (ImageFolder would count them as classes) or
    class folders without images."""
    if not os.path.isdir(path):
        sys.exit(f"{path} not found: --data must hold ImageFolder train/ and val/ folders, one "
                 f"sub-folder of images per class (e.g. train/n01440764/*.JPEG)")
    folders = sorted(e.name for e in os.scandir(path) if e.is_dir())
    hidden = [name for name in folders if name.startswith(".")]
    if hidden:
        sys.exit(f"{path} holds hidden folders ({', '.join(hidden)}): ImageFolder would count them as "
                 f"classes and shift the labels; move them out of {path}")
    if not folders:
        sys.exit(f"{path} has no class folders: expected {path}/<class>/<image files>")
    empty = [name for name in folders if not _has_image(os.path.join(path, name))]
    if empty:
        more = " ..." if len(empty) > 10 else ""
        sys.exit(f"{path}: class folders without images ({', '.join(IMG_EXTENSIONS)}): "
                 f"{', '.join(empty[:10])}{more}")
    return folders


def check_layout(root):
    """train/ and val/ with the same class folders (ImageFolder numbers each split by itself:
    one missing or extra folder shifts every label), or one message naming the differences."""
    train, val = (class_folders(os.path.join(root, split)) for split in ("train", "val"))
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        sys.exit(f"train/ and val/ of {root} must hold the same class folders; only in train/: "
                 f"{', '.join(only_train) or 'none'}; only in val/: {', '.join(only_val) or 'none'}")
    return train


def read_rgb(path):
    """uint8 (3, H, W), whatever the file's channels (grayscale and CMYK JPEGs exist in ImageNet)."""
    return torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)


def view_transform(size, blur_p, solarize_p):
    """One view's augmentation, as in BYOL (J.-B. Grill et al., "Bootstrap Your Own Latent: A New
    Approach to Self-Supervised Learning", NeurIPS 2020, arXiv:2006.07733) and VICReg: random
    resized crop (8-100% of the image), flip, colour jitter, grayscale, then blur and solarize
    with the view's own probabilities."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(23 if size >= 64 else 3, sigma=(0.1, 2.0))], p=blur_p),
        v2.RandomSolarize(128, p=solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size):
    """Clean images for the probes: resize to size · 256 / 224, centre crop."""
    return v2.Compose([v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TwoViews(torch.utils.data.Dataset):
    """Two views of each image: blur 1.0 / 0.1, solarize 0 / 0.2. The random stream of image i
    in epoch e is seeded by (seed, e, i), whichever rank or worker loads it."""

    def __init__(self, root, size, seed):
        self.folder = torchvision.datasets.ImageFolder(root, loader=read_rgb)
        self.t1, self.t2 = view_transform(size, 1.0, 0.0), view_transform(size, 0.1, 0.2)
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        img, label = self.folder[i]
        torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 100_000_007 + i)
        return self.t1(img), self.t2(img), label


def clean_loader(root, size, batch, workers, rank, world):
    """Centre crops of a split, sharded across ranks: rank r holds the images r, r + world, ..."""
    ds = torchvision.datasets.ImageFolder(root, transform=eval_transform(size), loader=read_rgb)
    idx = list(range(rank, len(ds), world))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch,
                                       num_workers=workers, pin_memory=torch.cuda.is_available())


# -----------------------------------------------------------------------------
# model: torchvision ResNet-50, projector (no predictor: SimSiam is not run on ImageNet)

def resnet50(zero_init_residual=True):
    """torchvision's ResNet-50 without its classifier. Output: pooled features (2048-d).
    zero_init_residual: each block starts as its shortcut (Goyal et al., arXiv:1706.02677)."""
    # fc is built and initialised (drawing from the RNG), then dropped
    net = torchvision.models.resnet50(zero_init_residual=zero_init_residual)
    net.fc = nn.Identity()
    net.dim = 2048
    return net


class SSLModel(nn.Module):
    """ResNet-50 and projector. loss as in train_cifar.py's SSLModel, where simsiam adds a
    predictor: neither ImageNet loss (peira, vicreg) has one."""

    def __init__(self, loss, proj, zero_init_residual=True):
        super().__init__()
        self.backbone = resnet50(zero_init_residual)
        dims = [self.backbone.dim] + proj
        self.projector = mlp(dims, last_bn=False)
        self.predictor = None

    def forward(self, x1, x2):
        """(h1, z1, z2, p1, p2), p1 = p2 = None (no predictor). Each view in its own forward:
        batch-norm statistics per view, as in the reference implementations of VICReg and BYOL."""
        h1, h2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(h1), self.projector(h2)
        return h1, z1, z2, None, None


# -----------------------------------------------------------------------------
# evaluation: online probe on val/, offline linear probe

@torch.no_grad()
def backbone_features(backbone, loader, device):
    """Features (in eval mode) and labels of this rank's shard of a clean loader."""
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(backbone(x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    backbone.train()
    return torch.cat(feats), torch.cat(labels)


def gather_on_rank0(f, y, rank, world):
    """The shards' features and labels in the split's order on rank 0, None on the other ranks
    (only rank 0 holds the whole split: 1.28M × 2048 floats are 10 GB). Rank 0 receives one
    shard at a time into one shard-sized buffer and fills the output from it: one copy of the
    split, not two."""
    if world == 1:
        return f, y
    n = torch.tensor([len(f)], device=f.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    if rank != 0:
        if sizes[rank]:
            dist.send(f.contiguous(), dst=0)
            dist.send(y.contiguous(), dst=0)
        return None, None
    out_f, out_y = f.new_empty(sum(sizes), f.shape[1]), y.new_empty(sum(sizes))
    out_f[0::world], out_y[0::world] = f, y  # rank r holds the images r, r + world, ...
    del f, y
    buf_f, buf_y = out_f.new_empty(max(sizes), out_f.shape[1]), out_y.new_empty(max(sizes))
    for r in range(1, world):
        if sizes[r]:
            dist.recv(buf_f[:sizes[r]], src=r)
            dist.recv(buf_y[:sizes[r]], src=r)
            out_f[r::world], out_y[r::world] = buf_f[:sizes[r]], buf_y[:sizes[r]]
    return out_f, out_y


def linear_probe(train_f, train_y, val_f, val_y, classes, args):
    """Linear classifier on frozen (centre-crop) features: SGD, cosine, wd 1e-6; top-1, top-5."""
    gen = torch.Generator().manual_seed(args.seed)
    with torch.random.fork_rng(devices=[]):  # the same probe for the same seed, whatever ran before
        torch.manual_seed(args.seed)
        clf = nn.Linear(train_f.shape[1], classes).to(train_f.device)
    opt = torch.optim.SGD(clf.parameters(), lr=args.probe_lr, momentum=0.9, weight_decay=1e-6)
    steps = args.probe_epochs * math.ceil(len(train_f) / args.probe_batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(args.probe_epochs), desc="linear probe", leave=False):
        perm = torch.randperm(len(train_f), generator=gen).to(train_f.device)
        for i in range(0, len(train_f), args.probe_batch):
            idx = perm[i:i + args.probe_batch]
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        top = clf(val_f).topk(min(5, classes), dim=1).indices
    return (top[:, 0] == val_y).float().mean().item(), (top == val_y[:, None]).any(1).float().mean().item()


def evaluate_checkpoint(args, classes, rank, world, device):
    """Features of every rank's shard, gathered on rank 0, which trains and evaluates the probe;
    the other ranks return None."""
    try:
        ckpt = read_checkpoint(args.eval)
    except ValueError as e:
        sys.exit(str(e))
    cfg = ckpt["config"]
    model = SSLModel(cfg["loss"], [int(d) for d in cfg["proj"].split("-")]).to(device)
    model.load_state_dict(ckpt["model"])
    splits = []
    for split in ("train", "val"):
        loader = clean_loader(os.path.join(args.data, split), args.image_size, 256, args.workers, rank, world)
        splits.append(gather_on_rank0(*backbone_features(model.backbone, loader, device), rank, world))
    if world > 1:
        dist.destroy_process_group()  # the other ranks are done: no collective waits on the probe
    if rank != 0:
        return None
    (trf, trl), (vaf, val) = splits
    top1, top5 = linear_probe(trf, trl, vaf, val, len(classes), args)
    print(f"{args.eval} (epoch {ckpt['epoch']}): linear probe top-1 {100 * top1:.2f}%  "
          f"top-5 {100 * top5:.2f}%")
    return {"top1": top1, "top5": top5, "epoch": ckpt["epoch"], "train_features": len(trf)}


# -----------------------------------------------------------------------------
# training

def check_args(args):
    """The --loss recipe fills the flags not given; then sanity checks (parser errors). Returns
    the projector widths."""
    recipe = RECIPES[args.loss]
    for key in ("wd", "warmup_epochs", "clip", "proj"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.lr is None:
        args.lr = recipe["lr"] if "lr" in recipe else recipe["lr_per_256"] * args.batch_size / 256
    if args.min_lr is None:
        args.min_lr = recipe["min_lr"] if "min_lr" in recipe else recipe["min_lr_ratio"] * args.lr
    problems, proj = setting_problems(args)
    if args.accum_steps < 1 or args.epochs < 1 or args.batch_size < 2:
        problems.append("--accum-steps ≥ 1, --epochs ≥ 1 and --batch-size ≥ 2 are required")
    if problems:
        parser.error("; ".join(problems))
    return proj


def main(argv=None):
    args = parser.parse_args(argv)
    proj = check_args(args)
    classes = check_layout(args.data)
    rank, world, device = setup_distributed()
    master = rank == 0
    if args.eval:
        return evaluate_checkpoint(args, classes, rank, world, device)
    micro = args.batch_size // (world * args.accum_steps)
    if micro * world * args.accum_steps != args.batch_size or micro < 2:
        parser.error(f"--batch-size {args.batch_size} must split into {world} ranks × {args.accum_steps} "
                     f"micro-batches of at least 2 images")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    config = {**vars(args), "world_size": world}
    ckpt = load_checkpoint(ckpt_path, rank)  # resume after a preemption or a --stop-after
    changes = [] if ckpt is None else check_resume(ckpt["config"], config, args.allow_change.split(","))
    if master:
        prepare_out(args, config, ckpt, metrics_path)

    # data
    dataset = TwoViews(os.path.join(args.data, "train"), args.image_size, args.seed)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, seed=args.seed,
                                                              drop_last=True)
    val_loader = clean_loader(os.path.join(args.data, "val"), args.image_size, 256, args.workers, rank, world)
    steps_per_epoch = len(sampler) // (micro * args.accum_steps)
    if steps_per_epoch == 0:
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(dataset)} training images")
    total_steps = args.epochs * steps_per_epoch

    # model, losses, optimisers
    torch.manual_seed(args.seed)
    model = SSLModel(args.loss, proj, args.zero_init_residual).to(device)
    model = model.to(memory_format=torch.channels_last)
    probe = nn.Linear(model.backbone.dim, len(classes)).to(device)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only; CPU ranks keep local BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # the loss of --loss peira; with --loss vicreg it only monitors the PEIRA objective (train_step)
    peira_loss = peira.PEIRALoss(proj[-1], lam=args.lam, eta=args.eta_start).to(device)
    vicreg_coeffs = vicreg_coefficients(args.vicreg_coeffs)
    opt = LARS(model.parameters(), lr=args.lr, weight_decay=args.wd, convention=args.lars)
    probe_opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    start_epoch = restore(ckpt, {"model": model, "probe": probe, "peira": peira_loss, "opt": opt,
                                 "probe_opt": probe_opt})
    if ckpt is not None and master:
        print(f"resumed from {ckpt_path} at epoch {start_epoch}", *changes, sep="\n  ")
    ddp, forward, autocast = wrap_for_training(model, args, world, device)

    # metrics.jsonl stays open for the run (rank 0), line-buffered: each record reaches the file as
    # it is written, so a crash or a preemption loses none
    last_epoch = min(args.epochs, start_epoch + args.stop_after) if args.stop_after else args.epochs
    with open(metrics_path, "a", buffering=1) if master else nullcontext() as metrics:
        for epoch in range(start_epoch, last_epoch):
            sampler.set_epoch(epoch)
            dataset.epoch = epoch  # workers hold a copy of the dataset: a new loader each epoch
            loader = torch.utils.data.DataLoader(dataset, batch_size=micro * args.accum_steps,
                                                 sampler=sampler, drop_last=True, num_workers=args.workers,
                                                 pin_memory=device.type == "cuda")
            t0, seen = time.time(), 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not master, leave=False)
            for i, batch in enumerate(bar):
                # schedule: learning rate (warmup, cosine) and η (linear anneal), functions of the step
                step = epoch * steps_per_epoch + i
                warmup = int(args.warmup_epochs * steps_per_epoch)
                lr = learning_rate(step, total_steps, warmup, args.lr, args.min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                eta = args.eta_start + (args.eta_end - args.eta_start) * step / max(total_steps - 1, 1)
                # forward, loss, PEIRA monitor, backward, steps of the model and online probe (train_step)
                x1, x2, y = (t.to(device, non_blocking=True) for t in batch)
                x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
                loss_value, _ = train_step(forward, ddp, model, probe, peira_loss, (opt, probe_opt),
                                           (x1, x2, y), args.loss, args.lam, eta, args.accum_steps,
                                           args.clip, world, autocast, vicreg_coeffs)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"non-finite loss {loss_value} at step {step} "
                                             f"(epoch {epoch + 1}); the last good checkpoint, if any, "
                                             f"is {ckpt_path}")
                # log: progress bar, one metrics record per step
                seen += len(x1)
                if master:
                    rate = seen / (time.time() - t0)
                    bar.set_postfix(loss=f"{loss_value:.4f}", img_s_gpu=f"{rate:.0f}")
                    metrics.write(json.dumps({"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr,
                                              "eta": eta}) + "\n")
            epoch_time = time.time() - t0

            # evaluation: online probe on val/ (correct counts summed over the ranks' shards)
            vf, vy = backbone_features(model.backbone, val_loader, device)
            with torch.no_grad():
                counts = torch.tensor([(probe(vf).argmax(1) == vy).sum().item(), len(vy)], device=device)
            if world > 1:
                dist.all_reduce(counts)
            probe_acc = (counts[0] / counts[1]).item()
            # every rank holds the same weights, probe and running moments (DDP, the probe's all-reduce;
            # the monitor of the other losses keeps each rank's moments until this all-reduce)
            if args.loss != "peira":
                peira_loss.all_reduce_moments()
            check_replicas([*model.parameters(), *probe.parameters(), peira_loss.N, peira_loss.S], world,
                           "weights or running moments")
            # log and checkpoint (rank 0)
            record = {"epoch": epoch + 1, "online_probe": probe_acc, "img_per_s_per_gpu": seen / epoch_time,
                      "epoch_time": epoch_time, **peira_loss.stats()}
            if master:
                print(f"epoch {epoch + 1}: loss {loss_value:.4f}  online probe {100 * probe_acc:.2f}%  "
                      f"objective {record['objective']:.4f}  {record['img_per_s_per_gpu']:.0f} img/s per GPU"
                      f"  {epoch_time / 60:.1f} min")
                metrics.write(json.dumps(record) + "\n")
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "probe": probe.state_dict(),
                                            "peira": peira_loss.state_dict(), "opt": opt.state_dict(),
                                            "probe_opt": probe_opt.state_dict(), "epoch": epoch + 1,
                                            "config": config})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
