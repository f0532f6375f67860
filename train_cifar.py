"""Self-supervised learning on CIFAR-10 with PEIRA (and the baselines it is compared with).

    python train_cifar.py                                  # PEIRA, preprint recipe (1000 epochs, GPU)
    python train_cifar.py --loss vicreg --epochs 200       # a baseline, same data and model
    torchrun --standalone --nproc_per_node=4 train_cifar.py  # several GPUs (DDP, SyncBatchNorm)
    python train_cifar.py --tiny                           # CPU smoke run, about a minute
    python train_cifar.py --resume                         # continue exactly from --out/ckpt.pt
    python train_cifar.py --eval out/cifar/ckpt.pt         # offline linear probe of a checkpoint

Losses (--loss): peira (running moments, η annealed, Algorithm 1 of the PEIRA preprint,
arXiv:2605.17671), peira_direct (P, Q from the global minibatch, back-propagated through the
inverse: the "bad" algorithm), simsiam (predictor + stop-gradient, SimSiam's own CIFAR recipe),
vicreg (25 / 25 / 1, global-batch statistics). Each loss runs the recipe in RECIPES unless flags
override it (README). Before the first step: the canonical correlations of two views of the
training images through the untrained network, and a warning when λ would switch off most of the
directions they show (README, Choosing λ). Every epoch: kNN accuracy (cosine, k 200, T 0.1, clean
train images as memory bank), the online linear probe (fit on the same clean features), the PEIRA
objective and diagnostics of the embeddings (for every loss; the view correlations after epoch 1,
every --view-corr-every epochs and after the last), a checkpoint (the previous one is kept as
ckpt.pt.prev). Writes into --out: config.json, metrics.jsonl, ckpt.pt, results.json,
objective_vs_knn.png, alignment_by_epoch.png; results and figures cover the whole run, across
resumes. --data takes CIFAR-10 in torchvision's format (downloaded when missing) or as an image
folder (train/<class>/*.jpg, test/<class>/*.jpg); bench_images.py writes splits in the first.
"""
import argparse
import json
import math
import os
import pickle
import socket
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as all_gather_with_grad
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2
from tqdm import tqdm

import peira

# -----------------------------------------------------------------------------
# hyperparameters: per-loss recipes, flags override them

parser = argparse.ArgumentParser(description="PEIRA on CIFAR-10",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
RECIPE = "default: the --loss recipe"
parser.add_argument("--data", default="./data",
                    help="folder holding cifar-10-batches-py (downloaded if missing), or train/ and test/ "
                         "with one folder of .jpg/.png images per class")
parser.add_argument("--out", default="out/cifar", help="output folder: config, metrics, checkpoint, figure")
parser.add_argument("--loss", default="peira", choices=["peira", "peira_direct", "simsiam", "vicreg"])
parser.add_argument("--epochs", type=int, default=1000)
parser.add_argument("--batch-size", type=int, help="global batch (split across ranks); " + RECIPE)
parser.add_argument("--optimizer", choices=["lars", "sgd"], help=RECIPE)
parser.add_argument("--lr", type=float, help="peak learning rate for the global batch; " + RECIPE)
parser.add_argument("--lars", default="vicreg", choices=["vicreg", "solo-learn"],
                    help="LARS's trust-ratio convention, named after the code it comes from (see LARS)")
parser.add_argument("--wd", type=float, help="weight decay (not on biases and norms); " + RECIPE)
parser.add_argument("--warmup-epochs", type=float, help=RECIPE)
parser.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction,
                    help="SimSiam: the predictor's learning rate stays at its peak, neither warmed up nor "
                         "decayed (SimSiam's --fix-pred-lr, solo-learn's static_lr); " + RECIPE)
parser.add_argument("--clip", type=float, help="gradient-norm clipping (0: off); " + RECIPE)
parser.add_argument("--clip-from", type=int, help="first epoch with clipping; " + RECIPE)
parser.add_argument("--lam", type=float, default=0.7, help="PEIRA λ (also used by the monitor)")
parser.add_argument("--eta-start", type=float, default=0.8, help="running-moment weight η at step 0")
parser.add_argument("--eta-end", type=float, default=0.5, help="η at the last step (linear anneal)")
parser.add_argument("--proj", help="projector widths, last = embedding dim k; " + RECIPE)
parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
parser.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
                    help="the last batch norm of each residual block starts at 0, so that each block starts "
                         "as its shortcut (as SimSiam's and VICReg's code)")
parser.add_argument("--vicreg-coeffs", metavar="A,B,C",
                    help="VICReg's invariance, variance and covariance coefficients (default: its paper's "
                         "25,25,1)")
parser.add_argument("--pred-hidden", type=int,
                    help="SimSiam: the predictor's hidden width (default: k/4, SimSiam's 2048-512-2048)")
parser.add_argument("--augment", default="batched", choices=["batched", "per-image"],
                    help="views augmented as whole batches on the training device, or image by image by "
                         "torchvision in DataLoader workers (the same distributions)")
parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="data-loading workers per rank (--augment per-image)")
parser.add_argument("--subset", type=int, default=0, help="use the first N train / N//2 test images (0: all)")
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                    help="bf16 autocast in training and in the per-epoch evaluation's forward passes "
                         "(moments and solves stay in float32)")
parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
parser.add_argument("--view-corr-every", type=int, default=1, metavar="E",
                    help="canonical correlations of two views of the training images (view_correlations: "
                         "about a third of a training epoch's compute) before training, after epoch 1, every "
                         "E epochs and after the last")
parser.add_argument("--tiny", action="store_true",
                    help="CPU preset: width 16, proj 128-128-64, 1024 images, 3 epochs, λ 0.1")
parser.add_argument("--resume", action="store_true",
                    help="continue from --out/ckpt.pt (its configuration must match, see --allow-change)")
parser.add_argument("--allow-change", default="", metavar="KEYS",
                    help="comma-separated settings that may differ from the checkpoint's on --resume, "
                         "e.g. epochs (the change is logged)")
parser.add_argument("--stop-after", type=int, default=0,
                    help="exit after this many epochs of this run (time-limited jobs; 0: run to --epochs)")
parser.add_argument("--eval", metavar="CKPT", help="offline linear probe of a checkpoint, then exit")
parser.add_argument("--probe-epochs", type=int, default=100, help="offline linear probe epochs (--eval)")
parser.add_argument("--seed", type=int, default=0)

PEIRA_RECIPE = dict(batch_size=256, optimizer="lars", lr=0.04, wd=1e-4, warmup_epochs=10, clip=1.0,
                    clip_from=4, proj="2048-2048-1024", fix_pred_lr=False)  # the preprint's CIFAR-10 recipe
RECIPES = {
    "peira": PEIRA_RECIPE, "peira_direct": PEIRA_RECIPE, "vicreg": PEIRA_RECIPE,
    # SimSiam's CIFAR recipe (Chen & He, CVPR 2021, appendix D): SGD momentum 0.9,
    # lr 0.03 · batch / 256, wd 5e-4, batch 512, cosine decay (no warmup, no clipping), a 2-layer
    # 2048-d projector with BN on its output; the predictor is 2048-512-2048 (k-k/4-k) and keeps the peak
    # learning rate, as in SimSiam's ImageNet runs (--fix-pred-lr) and solo-learn's CIFAR config
    # (static_lr); the CIFAR appendix does not say (README: measured on the CPU benchmark)
    "simsiam": dict(batch_size=512, optimizer="sgd", lr_per_256=0.03, wd=5e-4, warmup_epochs=0,
                    clip=0.0, clip_from=0, proj="2048-2048", fix_pred_lr=True),
}
TINY = dict(width=16, proj="128-128-64", subset=1024, epochs=3, batch_size=128, warmup_epochs=1,
            workers=2, clip_from=0, lam=0.1)  # λ 0.1, not the preprint's 0.7: README, Choosing λ
TINY_LARS_LR = 0.3  # --tiny with LARS (PEIRA, VICReg); SimSiam's SGD keeps its recipe's lr per 256 images
KNN_K, KNN_T = 200, 0.1          # kNN monitor (InstDisc / solo-learn)
PROBE_PASSES, PROBE_LR = 5, 0.1  # online probe: SGD passes over the clean training features per epoch
COLLAPSE_STD = 0.1               # warn when √k · std of the normalised embeddings falls below this
VIEW_CORR_IMAGES = 4096          # at least this many training images (and 64 per embedding dimension)
AUG_STEPS = 8                    # --augment batched on a GPU: steps whose views are made in one call
KEPT_WARN = 0.5                  # warn when PEIRA keeps (s > λ²) under this share of the directions seen
#                                  (and lam_max: the λ below which it keeps this share)
BEFORE_TRAINING = -1             # view_correlations' epoch for the untrained network
VICREG_COEFFS = (25.0, 25.0, 1.0)  # invariance, variance, covariance (official VICReg)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# settings added after checkpoints were written, with the value every run before them had: a
# configuration without one is compared as if it held that value (--resume, bench_images.py's reuse)
ADDED_SETTINGS = {"fix_pred_lr": False, "zero_init_residual": False, "pred_hidden": None,
                  "vicreg_coeffs": None}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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
# data: CIFAR-10 decoded once into uint8 tensors (torchvision's on-disk format or an image folder),
# two augmented views of each image, augmented as whole batches on the training device

def download_cifar(root):
    """torchvision's download of cifar-10-python.tar.gz (170 MB) into root (tests replace it)."""
    from torchvision.datasets import CIFAR10
    socket.setdefaulttimeout(30)
    CIFAR10(root, download=True)


def ensure_cifar(root, rank=0, world=1):
    """Download CIFAR-10 into root when it is missing: rank 0 alone downloads, the other ranks wait
    for its result. When that fails every rank exits with one message."""
    folder = os.path.join(root, "cifar-10-batches-py")
    error = None
    if rank == 0 and not os.path.isdir(folder):
        try:
            download_cifar(root)
        except Exception as e:
            error = (f"CIFAR-10 not found at {folder} and it could not be downloaded "
                     f"({type(e).__name__}: {e}).\nDownload cifar-10-python.tar.gz from "
                     f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into "
                     f"{os.path.abspath(root)} (it holds cifar-10-batches-py/data_batch_1..5, test_batch).")
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        sys.exit(error)


def load_cifar(root, train):
    """uint8 images (N, 3, 32, 32) and labels, read from root/cifar-10-batches-py; exits with
    one clear message when files are missing or corrupt."""
    folder = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    try:
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"])
    except Exception as e:
        sys.exit(f"CIFAR-10 at {folder} is missing files or corrupt ({type(e).__name__}: {e}). "
                 f"Delete the folder to download it again, or extract cifar-10-python.tar.gz there.")
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels)


def load_image_folder(root, split):
    """uint8 images (N, 3, 32, 32) and labels from root/split/<class>/*.{jpg,jpeg,png}, the ten
    CIFAR-10 class folders (labels in torchvision's order), in a fixed shuffled order (seed 0), so
    that --subset takes every class; exits with one clear message on a wrong layout or image."""
    folder = os.path.join(root, split)
    found = sorted(d for d in os.listdir(folder)  # hidden folders (.ipynb_checkpoints) are no class
                   if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    if found != sorted(CIFAR10_CLASSES):
        sys.exit(f"{folder} must hold one folder per CIFAR-10 class ({', '.join(CIFAR10_CLASSES)}); "
                 f"found {', '.join(found) or 'none'}")
    images, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        files = sorted(f for f in os.listdir(os.path.join(folder, name))
                       if f.lower().endswith((".jpg", ".jpeg", ".png")))
        if not files:
            sys.exit(f"{os.path.join(folder, name)} holds no .jpg, .jpeg or .png image")
        for f in files:
            path = os.path.join(folder, name, f)
            try:
                img = decode_image(read_file(path), mode=ImageReadMode.RGB)
            except Exception as e:
                sys.exit(f"{path} is not a readable image ({type(e).__name__}: {e})")
            if img.shape != (3, 32, 32):
                sys.exit(f"{path} is {img.shape[2]}×{img.shape[1]} pixels; CIFAR-10 images are 32×32")
            images.append(img)
        labels += [label] * len(files)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return torch.stack(images)[order], torch.tensor(labels)[order]


def load_splits(root, subset, rank=0, world=1):
    """Train and test images (N, 3, 32, 32, uint8) and labels: from root/train and root/test when
    they exist (image folders), else from torchvision's root/cifar-10-batches-py (downloaded when
    missing). The first `subset` train and subset // 2 test images when subset > 0."""
    splits = [os.path.isdir(os.path.join(root, split)) for split in ("train", "test")]
    if any(splits) and not all(splits):
        have, missing = ("train/", "test/") if splits[0] else ("test/", "train/")
        sys.exit(f"{root} holds {have} but not {missing}: an image folder needs both, one folder per class")
    if all(splits):
        (train_x, train_y), (test_x, test_y) = (load_image_folder(root, split) for split in ("train", "test"))
    else:
        ensure_cifar(root, rank, world)
        (train_x, train_y), (test_x, test_y) = load_cifar(root, True), load_cifar(root, False)
    if subset:
        return train_x[:subset], train_y[:subset], test_x[:subset // 2], test_y[:subset // 2]
    return train_x, train_y, test_x, test_y


def ssl_augment():
    """The standard CIFAR SSL recipe (solo-learn / VICReg): RandomResizedCrop(0.2, 1), flip,
    colour jitter, grayscale, solarize."""
    return v2.Compose([
        v2.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomSolarize(128, p=0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])


class TwoViews(torch.utils.data.Dataset):
    """Two augmented views of each image. The random stream of image i in epoch e is seeded by
    (seed, e, i), whichever rank or loader worker draws it: the views do not depend on --workers."""

    def __init__(self, images, labels, seed):
        self.images, self.labels, self.augment = images, labels, ssl_augment()
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 100_000_007 + i)
        return self.augment(img), self.augment(img), self.labels[i]


def epoch_loader(dataset, epoch, local_batch, rank, world, workers, pin_memory):
    """The loader of one epoch: its order is a function of (seed, epoch, rank), each item's views of
    (seed, epoch, index) (TwoViews), so a resumed run continues exactly with any --workers."""
    dataset.epoch = epoch  # workers hold a copy of the dataset: a new loader each epoch
    gen = torch.Generator().manual_seed(dataset.seed * 100_003 + epoch * 1009 + rank)
    sampler = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, seed=dataset.seed,
                                                                  drop_last=True)
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=workers, pin_memory=pin_memory, generator=gen, persistent_workers=False,
        prefetch_factor=4 if workers else None)


# batched augmentation: the views of a whole batch at once on the training device, with per-sample
# random parameters drawn as torchvision's v2 transforms of ssl_augment() draw them (same distributions,
# same order of operations; crops, flips and colour ops on floats, where the per-image pipeline rounds
# to uint8 between operations)

def sample_crop_boxes(n, gen, height=32, width=32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's boxes (top, left, h, w) for n images, vectorised: 10 trials of area ~
    U(scale)·H·W and log-uniform aspect ratio w/h, the first with 0 < w ≤ W and 0 < h ≤ H kept (all 10
    drawn), else the central crop clipped to the ratio range, as torchvision's make_params."""
    dev = gen.device
    area_frac = (torch.rand(n, 10, generator=gen, device=dev) * (scale[1] - scale[0]) + scale[0]).double()
    log_r = torch.rand(n, 10, generator=gen, device=dev) * (math.log(ratio[1]) - math.log(ratio[0]))
    aspect = (log_r + math.log(ratio[0])).exp().double()  # float32 exp as torchvision, then float64
    w = (area_frac * height * width * aspect).sqrt().round().long()
    h = (area_frac * height * width / aspect).sqrt().round().long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.long().argmax(1, keepdim=True)  # the first valid trial
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], valid.any(1)
    if width / height < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    top = (torch.rand(n, generator=gen, device=dev).double() * (height - h + 1)).floor().long()
    left = (torch.rand(n, generator=gen, device=dev).double() * (width - w + 1)).floor().long()
    top = torch.where(ok, torch.minimum(top, height - h), (height - fh) // 2)
    left = torch.where(ok, torch.minimum(left, width - w), (width - fw) // 2)
    return top, left, h, w


def sample_view_params(n, gen):
    """Every random number of ssl_augment() for n views, from gen, on gen's device: crop box, flip,
    colour jitter (applied with p 0.8; brightness, contrast in [0.6, 1.4], saturation in [0.8, 1.2],
    hue in [−0.1, 0.1]; each view's own random order of the four), grayscale (p 0.2), solarize (p 0.1)."""
    dev = gen.device

    def uniform(lo, hi):
        return torch.rand(n, generator=gen, device=dev) * (hi - lo) + lo

    top, left, height, width = sample_crop_boxes(n, gen)
    return {"top": top, "left": left, "height": height, "width": width,
            "flip": torch.rand(n, generator=gen, device=dev) < 0.5,
            "jitter": torch.rand(n, generator=gen, device=dev) < 0.8,
            "factors": torch.stack([uniform(0.6, 1.4), uniform(0.6, 1.4), uniform(0.8, 1.2),
                                    uniform(-0.1, 0.1)], 1),
            "jitter_order": torch.rand(n, 4, generator=gen, device=dev).argsort(1),
            "grayscale": torch.rand(n, generator=gen, device=dev) < 0.2,
            "solarize": torch.rand(n, generator=gen, device=dev) < 0.1}


def _resize_taps(start, length, in_size, out_size, taps):
    """Source indices and weights (n, out_size, taps) of torch's antialiased bilinear resize of the
    window [start, start + length) of an axis to out_size, per sample (aten's upsample_bilinear2d_aa:
    support max(scale, 1), triangle weights, normalised; plain bilinear when upsampling)."""
    scale = (length.double() / out_size)[:, None, None]
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out_size, device=start.device, dtype=torch.float64)[None, :, None] + 0.5)
    first = (centre - support + 0.5).trunc().clamp(min=0)
    pos = first + torch.arange(taps, device=start.device, dtype=torch.float64)  # relative to the window
    weights = (1 - ((pos + 0.5 - centre) / support).abs()).clamp(min=0)
    weights = weights * (pos < length.double()[:, None, None])  # taps inside the window only
    weights = weights / weights.sum(2, keepdim=True)
    return (pos.long() + start[:, None, None]).clamp(0, in_size - 1), weights.float()


def resized_crop(x, top, left, height, width, size, flip):
    """Per-sample crop of x (n, C, H, W) resized to size × size, mirrored where flip: equal to
    v2.functional.resized_crop(antialias=True) image by image. Separable: two batched products with
    per-sample resampling matrices (rows, then columns) that hold each output pixel's few taps, so it
    never reads outside the crop (unlike roi_align or grid_sample at the crop's border). Exact on uint8
    values for crops ≤ size (weights are multiples of 1/64) in float32 (not under TF32 or autocast)."""
    n, c, H, W = x.shape
    taps = math.ceil(2 * max(H / size, W / size, 1.0))  # 2 when upsampling
    iy, wy = _resize_taps(top, height, H, size, taps)
    ix, wx = _resize_taps(left, width, W, size, taps)
    ix, wx = torch.where(flip.view(n, 1, 1), ix.flip(1), ix), torch.where(flip.view(n, 1, 1), wx.flip(1), wx)
    rows = x.new_zeros(n, size, H).scatter_add_(2, iy, wy.to(x.dtype))  # (n, out y, in y)
    cols = x.new_zeros(n, size, W).scatter_add_(2, ix, wx.to(x.dtype))  # (n, out x, in x)
    y = torch.bmm(rows, x.permute(0, 2, 1, 3).reshape(n, H, c * W))       # (n, size, c·W)
    y = y.view(n, size, c, W).transpose(1, 2).reshape(n, c * size, W)
    return torch.bmm(y, cols.transpose(1, 2)).view(n, c, size, size)


def _gray(x):
    """ITU-R 601 luma (n, 1, H, W), torchvision's weights and order of operations."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _where_apply(mask, fn, x):
    """fn(x) where mask (one bool per image), x elsewhere; x is a tensor of augment_batch's own, changed
    in place on a CPU, where fn runs on the selected images only; on a GPU fn runs on all of them, then
    torch.where selects (no data-dependent shape, hence no host sync)."""
    if x.device.type == "cpu":
        idx = mask.nonzero().view(-1)
        x[idx] = fn(x[idx], idx)
        return x
    return torch.where(mask.view(-1, 1, 1, 1), fn(x, slice(None)), x)


def adjust_hue(x, shift):
    """v2.functional.adjust_hue per image (shift (n,), in turns): the hue h ∈ [0, 6) of each pixel
    moves by 6·shift, max and min channel kept; written in sextants instead of the RGB → HSV → RGB
    round trip (the same to ~1e-6, fewer tensor operations)."""
    r, g, b = x.unbind(1)
    mx, mn = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    d = mx - mn
    h6 = torch.where(mx == r, g - b, torch.where(mx == g, b - r + 2 * d, r - g + 4 * d))
    h6 = (h6 / torch.where(d == 0, 1.0, d) + 6 * shift.view(-1, 1, 1)).remainder(6.0)
    out = [mx - d * torch.minimum(k, 4 - k).clamp(0, 1) for k in ((h6 + o).remainder(6.0) for o in (5, 3, 1))]
    return torch.stack(out, 1)


def color_jitter(x, on, order, factors):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) per sample where on: in round r each view gets the operation
    order[:, r] names (0 brightness, 1 contrast, 2 saturation, 3 hue) with its factor. The three blends
    with black, the image's mean grey or its grey image (torchvision's _blend, clamped to [0, 1]) are
    one blend per round, with factor 1 for the views that do not blend (1·x + 0·target: x exactly)."""
    on = on.view(-1, 1, 1, 1)
    for r in range(4):
        op = order[:, r].view(-1, 1, 1, 1)
        gray = _gray(x)
        target = torch.where(op == 2, gray, gray.mean((1, 2, 3), keepdim=True)) * (op != 0)
        ratio = torch.where(on & (op < 3), factors.gather(1, order[:, r:r + 1]).view(-1, 1, 1, 1), 1.0)
        x = (ratio * x).add_((1 - ratio) * target).clamp_(0, 1)  # torchvision's _blend formula
        x = _where_apply((on & (op == 3)).view(-1), lambda y, idx: adjust_hue(y, factors[idx, 3]), x)
    return x


def augment_batch(images, params):
    """Normalised float32 views (n, 3, 32, 32) of uint8 images (n, 3, 32, 32) with sample_view_params'
    parameters, in ssl_augment()'s order: crop and resize, flip, colour jitter, grayscale, solarize
    (values ≥ 128/255: the uint8 pipeline's ≥ 128), normalise."""
    p = params
    x = resized_crop(images.float(), p["top"], p["left"], p["height"], p["width"], 32, p["flip"]).div_(255)
    x = color_jitter(x, p["jitter"], p["jitter_order"], p["factors"])
    x = _where_apply(p["grayscale"], lambda y, idx: _gray(y).expand_as(y), x)
    x = _where_apply(p["solarize"], lambda y, idx: torch.where(y >= 128 / 255, 1 - y, y), x)
    for c, (mean, std) in enumerate(zip(CIFAR_MEAN, CIFAR_STD)):  # Python numbers: no copy to the device
        x[:, c].sub_(mean).div_(std)
    return x


def augment_steps(device):
    """Steps whose views batched_epoch makes in one call by default: AUG_STEPS on a GPU, 1 on a CPU
    (where larger calls ran 10–30% slower, out of cache)."""
    return AUG_STEPS if device.type == "cuda" else 1


def batched_epoch(images, labels, seed, epoch, global_batch, rank, world, chunk=None):
    """The batches (x1, x2, y) of one epoch for this rank, augmented on images' device. The order is a
    permutation drawn from (seed, epoch) and the views of step i from (seed, epoch, i) for the whole
    global batch, of which each rank takes its rows: the views are those of one process on the global
    batch, whatever the number of ranks, and a resumed run continues exactly. Both views of `chunk`
    steps are augmented in one call (the same views: each image's are computed on its own), so that
    on a GPU the pipeline's few hundred small kernels run once per chunk, not twice per step. chunk
    None: augment_steps(images' device)."""
    chunk = chunk or augment_steps(images.device)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    order = order.to(images.device)  # once per epoch
    local, steps = global_batch // world, len(images) // global_batch
    rows = slice(rank * local, (rank + 1) * local)
    for first in range(0, steps, chunk):
        idx, params = [], []
        for i in range(first, min(first + chunk, steps)):
            gen = torch.Generator(device=images.device).manual_seed((seed * 1_000_003 + epoch) * 100_003 + i)
            views = [sample_view_params(global_batch, gen) for _ in range(2)]
            step_idx = order[i * global_batch:(i + 1) * global_batch][rows]
            idx += [step_idx, step_idx]
            params += [{k: t[rows] for k, t in p.items()} for p in views]
        x = augment_batch(images[torch.cat(idx)], {k: torch.cat([p[k] for p in params]) for k in params[0]})
        x = x.split(local)
        for j in range(0, len(x), 2):
            yield x[j], x[j + 1], labels[idx[j]]


def normalize_clean(images, device):
    x = images.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)


# -----------------------------------------------------------------------------
# model: ResNet-18 with the CIFAR stem, projector, SimSiam predictor

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem: 3×3 conv, stride 1, no max-pool. Output: pooled features."""

    def __init__(self, width=64, zero_init_residual=True):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        blocks, cin = [], w[0]
        for i, cout in enumerate(w):
            blocks += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        if zero_init_residual:  # each block starts as its shortcut (Goyal et al., arXiv:1706.02677)
            for block in blocks:
                nn.init.zeros_(block.bn2.weight)
        self.dim = w[-1]
        self.to(memory_format=torch.channels_last)  # NHWC: the faster convolutions of oneDNN and cuDNN

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)


def predictor_width(pred_hidden, k):
    """SimSiam's predictor hidden width: --pred-hidden, by default a bottleneck of a quarter of the
    embedding's k (2048-512-2048)."""
    return pred_hidden or k // 4


class SSLModel(nn.Module):
    def __init__(self, loss, width, proj, pred_hidden=None, zero_init_residual=True):
        super().__init__()
        self.backbone = ResNet18(width, zero_init_residual)
        dims = [self.backbone.dim] + proj
        self.projector = mlp(dims, last_bn=loss == "simsiam")
        hidden = predictor_width(pred_hidden, dims[-1])
        self.predictor = mlp([dims[-1], hidden, dims[-1]], False) if loss == "simsiam" else None

    def forward(self, x1, x2):
        """(h1, z1, z2, p1, p2). Each view in its own forward: batch-norm statistics per view, as
        in the reference implementations of SimSiam, VICReg and BYOL."""
        h1, h2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(h1), self.projector(h2)
        if self.predictor is None:
            return h1, z1, z2, None, None
        return h1, z1, z2, self.predictor(z1), self.predictor(z2)


def make_optimizer(model, args):
    """LARS, or SGD with momentum 0.9 and no weight decay on biases and norms. With --fix-pred-lr the
    predictor's parameters form groups marked fixed_lr, which the schedule leaves at the peak."""
    fixed = {id(p) for p in model.predictor.parameters()} if args.fix_pred_lr else set()
    parts = [([p for p in model.parameters() if (id(p) in fixed) == f], f) for f in (False, True)]
    if args.optimizer == "lars":
        groups = [{"params": ps, "fixed_lr": f} for ps, f in parts if ps]
        return LARS(groups, lr=args.lr, weight_decay=args.wd, convention=args.lars)
    groups = [{"params": [p for p in ps if (p.ndim > 1) == decay], "fixed_lr": f,
               "weight_decay": args.wd if decay else 0.0} for ps, f in parts for decay in (True, False)]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=args.lr, momentum=0.9)


# -----------------------------------------------------------------------------
# evaluation: kNN monitor, linear probes

@torch.no_grad()
def features(network, images, device, params=None, batch=512, bf16=False):
    """Outputs of network (in eval mode, under bf16 autocast with bf16) on clean images, or on their
    views drawn with params (sample_view_params' rows for these images); float32."""
    network.eval()
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device, non_blocking=True)
        x = normalize_clean(x, device) if params is None else augment_batch(x, {k: t[i:i + batch] for k, t in
                                                                                 params.items()})
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(network(x).float())
    network.train()
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_feat, train_labels, test_feat, test_labels, k=KNN_K, t=KNN_T, classes=10):
    """Weighted kNN (cosine similarity, votes exp(sim / T)), as in InstDisc and solo-learn."""
    correct = 0
    k = min(k, len(train_feat))
    for i in range(0, len(test_feat), 1024):
        sim, idx = (test_feat[i:i + 1024] @ train_feat.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_labels[i:i + 1024]).sum().item()
    return correct / len(test_feat)


def all_gather_cat(x, world):
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def sharded_features(network, images, device, rank, world, params=None, bf16=False):
    """features() of all images, each rank computing a contiguous shard (then all-gathered)."""
    per = math.ceil(len(images) / world)
    shard = slice(rank * per, (rank + 1) * per)
    local = features(network, images[shard], device, None if params is None else
                     {k: t[shard] for k, t in params.items()}, bf16=bf16)
    if world == 1:
        return local
    padded = torch.zeros(per, local.shape[1], device=device)
    padded[:len(local)] = local
    return all_gather_cat(padded, world)[:len(images)]


def view_correlations(model, images, lam, seed, epoch, device, rank, world, bf16=False, spectrum=False):
    """Canonical correlations of the embeddings of two augmented views of each of the first
    max(VIEW_CORR_IMAGES, 64 k) training images (a sample large against k, unlike a batch or the running
    moments) against their null, the same pairs shuffled across images
    (peira.canonical_correlations_with_null): the level at which the sample sees a direction; how many
    directions pass it, how many of those PEIRA keeps (s > λ²), and lam_max, the λ below which it keeps at
    least KEPT_WARN of them. epoch BEFORE_TRAINING is the untrained network's pass (its seeds, negative
    for seed 0, wrap to 2⁶⁴ − x: no epoch's). With spectrum, also the correlations seen ("corr_seen",
    descending). Under bf16 the rounding noise, independent between the views, lowers both the correlations
    and their null a little."""
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 100_003 + 99_991)
    embed = nn.Sequential(model.backbone, model.projector)
    k = next(m.out_features for m in reversed(model.projector) if isinstance(m, nn.Linear))
    images = images[:max(VIEW_CORR_IMAGES, 64 * k)]
    u, v = (sharded_features(embed, images, device, rank, world, sample_view_params(len(images), gen), bf16)
            for _ in range(2))
    shuffle = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    corr, null = peira.canonical_correlations_with_null(u, v, shuffle)
    if len(corr) == 0:  # the embeddings collapsed to one point: no direction left to correlate
        return {"null_level": math.nan, "signal_dims": 0, "kept_dims": 0, "corr_top": 0.0,
                "lam_max": math.nan, **({"corr_seen": []} if spectrum else {})}
    seen = corr[corr > null[0]]
    return {"null_level": null[0].item(), "signal_dims": len(seen), "kept_dims": int((seen > lam ** 2).sum()),
            "corr_top": corr[0].item(), "lam_max": lam_keeping(seen, KEPT_WARN),
            **({"corr_seen": seen.tolist()} if spectrum else {})}


def keeps_too_few(stats):
    """Whether view_correlations' stats (if this epoch has them) show PEIRA keeping under KEPT_WARN of
    the directions seen: the condition of both λ warnings."""
    return "signal_dims" in stats and stats["kept_dims"] < KEPT_WARN * stats["signal_dims"]


def lam_keeping(corr, share):
    """The λ below which PEIRA keeps (s > λ²) at least `share` of the canonical correlations `corr`
    (descending): the square root of the ⌈share · len⌉-th largest; nan when corr is empty."""
    return corr[math.ceil(share * len(corr)) - 1].sqrt().item() if len(corr) else math.nan


def sgd_passes(classifier, opt, feats, labels, passes, gen, batch, sched=None, desc=None):
    """Passes of minibatch SGD (cross-entropy) over fixed features, in the order drawn from gen."""
    for _ in tqdm(range(passes), desc=desc, leave=False, disable=desc is None):
        perm = torch.randperm(len(feats), generator=gen).to(feats.device)
        for i in range(0, len(feats), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(classifier(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()


class OnlineProbe(nn.Module):
    """The online linear probe: features standardised with the mean and std of the clean training
    features (set each epoch), so that one learning rate suits features of any scale, then a linear
    layer."""

    def __init__(self, dim, classes):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, classes)

    def forward(self, feat):
        return self.linear((feat - self.mean) / self.std)


def fit_online_probe(probe, probe_opt, train_feat, train_y, passes, seed, batch=256):
    """The online probe's training of one epoch: `passes` passes of SGD over the clean training
    features (the kNN memory bank), from the weights it ended the previous epoch with, so that it
    reads the same distribution as kNN and is evaluated on (clean images, batch-norm in eval mode),
    not that of the augmented views. Every rank holds all the features and fits from the same seed;
    rank 0's probe is then broadcast, so that the ranks hold it bit for bit whatever the kernels."""
    probe.mean.copy_(train_feat.mean(0))
    std = train_feat.std(0)
    probe.std.copy_(std.clamp_min(1e-3 * std.mean().clamp_min(1e-12)))  # no division by ~0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sgd_passes(probe, probe_opt, train_feat, train_y, passes, gen, batch)
    if dist.is_available() and dist.is_initialized():
        for t in (*probe.parameters(), *probe.buffers()):
            dist.broadcast(t.data, 0)


def linear_probe(train_x, train_y, test_x, test_y, epochs, seed, batch=1024):
    """Offline linear probe on frozen features: SGD, momentum 0.9, cosine lr; top-1 / top-5."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the same probe for the same seed, whatever ran before
        torch.manual_seed(seed)
        clf = nn.Linear(train_x.shape[1], 10).to(train_x.device)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    steps = epochs * math.ceil(len(train_x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    sgd_passes(clf, opt, train_x, train_y, epochs, gen, batch, sched, desc="linear probe")
    with torch.no_grad():
        top5 = clf(test_x).topk(5, dim=1).indices
    top1 = (top5[:, 0] == test_y).float().mean().item()
    return top1, (top5 == test_y[:, None]).any(1).float().mean().item()


def evaluate_checkpoint(args, rank, world, device):
    """Offline linear probe and kNN of a checkpoint. Under torchrun rank 0 alone downloads CIFAR-10,
    each rank computes a shard of the features, and rank 0 alone trains and evaluates the probe;
    the other ranks return None (the caller ends the process group)."""
    try:
        ckpt = read_checkpoint(args.eval)
    except ValueError as e:
        sys.exit(str(e))
    cfg = ckpt["config"]
    model = SSLModel(cfg["loss"], cfg["width"], [int(d) for d in cfg["proj"].split("-")],
                     cfg.get("pred_hidden")).to(device)
    model.load_state_dict(ckpt["model"])
    train_x, train_y, test_x, test_y = load_splits(args.data, cfg["subset"], rank, world)
    bf16 = cfg.get("bf16", False)  # the features in the precision the network was trained in
    ftr = F.normalize(sharded_features(model.backbone, train_x, device, rank, world, bf16=bf16), dim=1)
    fte = F.normalize(sharded_features(model.backbone, test_x, device, rank, world, bf16=bf16), dim=1)
    if rank != 0:
        return None
    train_y, test_y = train_y.to(device), test_y.to(device)
    top1, top5 = linear_probe(ftr, train_y, fte, test_y, args.probe_epochs, args.seed)
    knn = knn_accuracy(ftr, train_y, fte, test_y)
    print(f"{args.eval} (epoch {ckpt['epoch']}): linear probe top-1 {100 * top1:.2f}%, "
          f"top-5 {100 * top5:.2f}%, kNN {100 * knn:.2f}%")
    return {"linear_top1": top1, "linear_top5": top5, "knn": knn, "epoch": ckpt["epoch"]}


# -----------------------------------------------------------------------------
# results: collapse warning, final table and figures

def embedding_spread(z):
    """√k times the mean per-dimension std of the L2-normalised embeddings: about 1 when they
    spread over the sphere, 0 at collapse (SimSiam's monitor)."""
    zn = F.normalize(z.detach().float(), dim=1)
    return (zn.std(0).mean() * zn.shape[1] ** 0.5).item()


def finish(args, history):
    """Results table, results.json and two figures, over every epoch of the run (metrics.jsonl,
    across resumes): the PEIRA objective against kNN accuracy, and the alignment of the regressor P
    with the cross-moment S by epoch (as in the talk cited in README.md)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    last = history[-1]
    corr = None
    if len(history) > 2:
        corr = float(np.corrcoef([h["objective"] for h in history], [h["knn"] for h in history])[0, 1])
    results = {"loss": args.loss, "lam": args.lam, "epochs": last["epoch"], "epochs_logged": len(history),
               "knn": last["knn"], "online_probe": last["online_probe"], "objective": last["objective"],
               "rank_N": last["rank_N"], "alignment": last["alignment"],
               "train_time_s": float(sum(h["epoch_time"] for h in history)),
               "img_per_s": float(np.mean([h["img_per_s"] for h in history])), "objective_knn_corr": corr}
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sc = ax.scatter([100 * h["knn"] for h in history], [h["objective"] for h in history], c=epochs)
    fig.colorbar(sc, label="epoch")
    ax.set(xlabel="kNN accuracy (%)", ylabel=f"PEIRA objective (λ = {args.lam})",
           title=f"--loss {args.loss}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "objective_vs_knn.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["alignment"] for h in history], marker="o")
    ax.set(xlabel="epoch", ylabel="alignment of P with S", ylim=(0, 1.02), title=f"--loss {args.loss}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "alignment_by_epoch.png"), dpi=120)
    plt.close(fig)
    print("\n| loss | epochs | kNN (%) | online probe (%) | PEIRA objective | rank(N) | alignment | "
          "img/s | corr(objective, kNN) |")
    print("|---|---|---|---|---|---|---|---|---|")
    corr = "—" if corr is None else f"{corr:.2f}"
    print(f"| {args.loss} | {results['epochs']} | {100 * results['knn']:.2f} | "
          f"{100 * results['online_probe']:.2f} | {results['objective']:.4f} | {results['rank_N']:.1f} | "
          f"{results['alignment']:.3f} | {results['img_per_s']:.0f} | {corr} |")


# -----------------------------------------------------------------------------
# training

def parse_args(argv=None):
    """The flags; with --tiny its preset replaces the defaults (a flag on the command line wins:
    argparse fills only the attributes that the namespace it is handed does not hold)."""
    args = parser.parse_args(argv)
    if args.tiny:
        args = parser.parse_args(argv, namespace=argparse.Namespace(**TINY))
    return args


def check_args(args):
    """The --loss recipe fills the flags not given (nor set by --tiny); then sanity checks."""
    recipe = RECIPES[args.loss]
    for key in ("batch_size", "optimizer", "wd", "warmup_epochs", "clip", "clip_from", "proj", "fix_pred_lr"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    if args.lr is None and args.tiny and args.optimizer == "lars":
        args.lr = TINY_LARS_LR
    elif args.lr is None:
        args.lr = recipe["lr"] if "lr" in recipe else recipe["lr_per_256"] * args.batch_size / 256
    problems, proj = setting_problems(args)
    if args.epochs < 1 or args.batch_size < 2 or args.lr <= 0:
        problems.append("--epochs ≥ 1, --batch-size ≥ 2 and --lr > 0 are required")
    for flag, value in (("--fix-pred-lr", args.fix_pred_lr), ("--pred-hidden", args.pred_hidden)):
        if value and args.loss != "simsiam":
            problems.append(f"{flag}: --loss {args.loss} has no predictor")
    if args.pred_hidden is not None and args.pred_hidden < 1:
        problems.append(f"--pred-hidden must be ≥ 1 (got {args.pred_hidden})")
    if args.view_corr_every < 1:
        problems.append(f"--view-corr-every must be ≥ 1 (got {args.view_corr_every})")
    if problems:
        parser.error("; ".join(problems))
    return proj


def main(argv=None):
    args = parse_args(argv)
    proj = check_args(args)
    rank, world, device = setup_distributed()
    master = rank == 0
    if args.eval:
        result = evaluate_checkpoint(args, rank, world, device)
        if world > 1:
            dist.destroy_process_group()
        return result
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is not divisible by {world} ranks")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    config = {**vars(args), "world_size": world}
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, rank)
        if ckpt is None:
            sys.exit(f"--resume: no checkpoint at {ckpt_path}")
        changes = check_resume(ckpt["config"], config, args.allow_change.split(","))
        saved = with_added_settings(ckpt["config"], config)  # even if allowed:
        if saved["fix_pred_lr"] != args.fix_pred_lr:
            sys.exit("cannot resume with another --fix-pred-lr: it regroups the optimiser's saved state")
        if predictor_width(saved["pred_hidden"], proj[-1]) != predictor_width(args.pred_hidden, proj[-1]):
            sys.exit("cannot resume with another --pred-hidden: the saved predictor has another shape")
    if master:
        prepare_out(args, config, ckpt, metrics_path)

    # data
    train_x, train_y, test_x, test_y = load_splits(args.data, args.subset, rank, world)
    train_labels, test_labels = train_y.to(device), test_y.to(device)  # for the views, kNN and the probe
    train_images = train_x.to(device) if args.augment == "batched" else None  # one uint8 tensor, 150 MB
    dataset = TwoViews(train_x, train_y, args.seed) if args.augment == "per-image" else None
    local_batch = args.batch_size // world
    steps_per_epoch = len(train_x) // args.batch_size
    if steps_per_epoch == 0:
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(train_x)} training images")
    total_steps = args.epochs * steps_per_epoch

    # model, losses, optimisers
    torch.manual_seed(args.seed)
    model = SSLModel(args.loss, args.width, proj, args.pred_hidden, args.zero_init_residual).to(device)
    probe = OnlineProbe(model.backbone.dim, 10).to(device)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only; CPU ranks keep local BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # the loss of --loss peira; for the other losses it only monitors (objective, rank, alignment)
    peira_loss = peira.PEIRALoss(proj[-1], lam=args.lam, eta=args.eta_start).to(device)
    vicreg_coeffs = vicreg_coefficients(args.vicreg_coeffs)
    opt = make_optimizer(model, args)
    probe_opt = torch.optim.SGD(probe.parameters(), lr=PROBE_LR, momentum=0.9)
    start_epoch = restore(ckpt, {"model": model, "probe": probe, "peira": peira_loss, "opt": opt,
                                 "probe_opt": probe_opt})
    if ckpt is not None and master:
        print(f"resumed from {ckpt_path} at epoch {start_epoch}", *changes, sep="\n  ")
    ddp, forward, autocast = wrap_for_training(model, args, world, device)

    # λ against the untrained network's views, whose canonical correlations λ has not moved yet (README,
    # Choosing λ): a λ that switches off most of the directions they show can collapse the run
    images = train_x if train_images is None else train_images
    initial = None
    if start_epoch == 0:
        initial = {"epoch": 0, **view_correlations(model, images, args.lam, args.seed, BEFORE_TRAINING,
                                                   device, rank, world, args.bf16)}
        if master:
            below = (f"; λ below {initial['lam_max']:.2f} keeps at least half of them"
                     if initial["signal_dims"] else "")
            print(f"initialisation: directions seen {initial['signal_dims']} (null "
                  f"{initial['null_level']:.2f}, top {initial['corr_top']:.2f}){below}")
            if args.loss == "peira" and keeps_too_few(initial):
                print(f"warning: λ {args.lam} keeps {initial['kept_dims']} of the {initial['signal_dims']} "
                      f"directions the untrained network's views show above their null (s > λ²): "
                      f"PEIRA switches the others off from the start and may collapse; λ below "
                      f"{initial['lam_max']:.2f} keeps at least half of them")

    # metrics.jsonl stays open for the run (rank 0), line-buffered: each record reaches the file as
    # it is written, so a crash or a preemption loses none
    history = []
    last_epoch = min(args.epochs, start_epoch + args.stop_after) if args.stop_after else args.epochs
    with open(metrics_path, "a", buffering=1) if master else nullcontext() as metrics:
        if master and initial is not None:
            metrics.write(json.dumps(initial) + "\n")
        for epoch in range(start_epoch, last_epoch):
            # the epoch's order and augmentations are functions of (seed, epoch, step or index): exact resume
            torch.manual_seed(args.seed * 100_003 + epoch * 1009 + rank)
            if args.augment == "batched":
                batches = batched_epoch(train_images, train_labels, args.seed, epoch, args.batch_size, rank,
                                        world)
            else:
                batches = epoch_loader(dataset, epoch, local_batch, rank, world, args.workers,
                                       device.type == "cuda")
            t0, seen = time.time(), 0
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch,
                       disable=not master, leave=False)
            for i, batch in enumerate(bar):
                # schedule: learning rate (warmup, cosine), η (linear anneal), clipping: functions of step
                step = epoch * steps_per_epoch + i
                lr = learning_rate(step, total_steps, int(args.warmup_epochs * steps_per_epoch), args.lr)
                for g in opt.param_groups:
                    g["lr"] = args.lr if g.get("fixed_lr") else lr  # absent from older checkpoints
                eta = args.eta_start + (args.eta_end - args.eta_start) * step / max(total_steps - 1, 1)
                clip = args.clip if epoch >= args.clip_from else 0.0
                # forward, loss, PEIRA monitor, backward, step (train_step; the probe is fit per epoch)
                batch = [t.to(device, non_blocking=True) for t in batch]
                loss_value, z = train_step(forward, ddp, model, None, peira_loss, (opt, None), batch,
                                           args.loss, args.lam, eta, 1, clip, world, autocast,
                                           vicreg_coeffs)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"non-finite loss {loss_value} at step {step} (epoch "
                                             f"{epoch + 1}); the last good checkpoint, if any, is "
                                             f"{ckpt_path}")
                # log: progress bar, one metrics record per step
                seen += len(batch[0]) * world  # images (two views each), as bench.py counts
                if master:
                    bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{seen / (time.time() - t0):.0f}")
                    metrics.write(json.dumps({"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr,
                                              "eta": eta}) + "\n")
            epoch_time = time.time() - t0

            # evaluation: kNN on clean images, the online probe fit on them, PEIRA diagnostics
            train_feat = sharded_features(model.backbone, train_x, device, rank, world, bf16=args.bf16)
            test_feat = sharded_features(model.backbone, test_x, device, rank, world, bf16=args.bf16)
            knn = knn_accuracy(F.normalize(train_feat, dim=1), train_labels,
                               F.normalize(test_feat, dim=1), test_labels)
            fit_online_probe(probe, probe_opt, train_feat, train_labels, PROBE_PASSES,
                             args.seed * 100_003 + epoch)
            with torch.no_grad():
                probe_acc = (probe(test_feat).argmax(1) == test_labels).float().mean().item()
            if args.loss != "peira":  # the monitor of the other losses keeps each rank's moments
                peira_loss.all_reduce_moments()
            stats = peira_loss.stats()
            if epoch == 0 or (epoch + 1) % args.view_corr_every == 0 or epoch + 1 == args.epochs:
                stats.update(view_correlations(model, images, args.lam, args.seed, epoch, device, rank, world,
                                               args.bf16))
            std = embedding_spread(z)  # the last batch's embeddings of view 1
            record = {"epoch": epoch + 1, "knn": knn, "online_probe": probe_acc, "loss": loss_value,
                      "lr": lr, "img_per_s": seen / epoch_time, "epoch_time": epoch_time,
                      "normalized_std": std, **stats}
            history.append(record)
            # every rank holds the same weights, probe and running moments (DDP; the same probe fit)
            check_replicas([*model.parameters(), *probe.parameters(), *probe.buffers(), peira_loss.N,
                            peira_loss.S], world, "weights or running moments")
            # log and checkpoint (rank 0)
            if master:
                if std < COLLAPSE_STD:
                    print(f"warning: embeddings collapsing at epoch {epoch + 1}: √k·std of normalised "
                          f"embeddings {std:.3f}")
                if args.loss == "peira" and keeps_too_few(stats):
                    print(f"warning: λ {args.lam} keeps {stats['kept_dims']} of the {stats['signal_dims']} "
                          f"directions the training images show above their null (s > λ²): "
                          f"PEIRA is switching the others off; a smaller --lam keeps them")
                seen_dims = (f"directions seen {stats['signal_dims']} (null {stats['null_level']:.2f})  "
                             if "signal_dims" in stats else "")
                print(f"epoch {epoch + 1}: loss {loss_value:.4f}  kNN {100 * knn:.2f}%  "
                      f"probe {100 * probe_acc:.2f}%  objective {stats['objective']:.4f}  "
                      f"rank(N) {stats['rank_N']:.1f}  {seen_dims}{seen / epoch_time:.0f} img/s")
                metrics.write(json.dumps(record) + "\n")
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "probe": probe.state_dict(),
                                            "peira": peira_loss.state_dict(), "opt": opt.state_dict(),
                                            "probe_opt": probe_opt.state_dict(), "epoch": epoch + 1,
                                            "config": config})
    if master and history:
        history = [r for r in metrics_records(metrics_path) if "knn" in r]  # the whole run
        finish(args, history)
    if world > 1:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
