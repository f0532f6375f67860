"""Self-supervised ResNet-50 on ImageNet-1k with PEIRA, one GPU to many nodes (torchrun).

    torchrun --standalone --nproc_per_node=8 train_imagenet.py --data /path/to/imagenet
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 \\
        train_imagenet.py --data /path/to/imagenet            # 32 GPUs, same global batch 2048
    python train_imagenet.py --data /path/to/imagenet --accum-steps 8   # one GPU, 8 micro-batches
    python train_imagenet.py --data /path/to/imagenet --eval out/imagenet/ckpt.pt   # linear probe

--data holds ImageFolder train/ and val/ (one folder per class). Defaults are the preprint's:
PEIRA λ 0.1, η 0.9 → 0.5, global batch 2048, LARS lr 2.4 (10 warmup epochs, cosine to 2e-3),
wd 1e-6, 100 epochs, clipping 1.0, projector 8192-8192-256, bf16 autocast, SyncBatchNorm.
--loss vicreg is the baseline. A run restarted with the same --out resumes from its last
checkpoint (preemption); the data order and every augmentation are functions of (seed, epoch,
image index), so a resumed run continues exactly and ranks never share augmentations.
With --accum-steps a > 1 each micro-batch is a PEIRA step with η_micro = 1 − (1 − η)^(1/a),
so the moments decay over an optimiser step as they would with the whole batch.
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
from torchvision.transforms import v2
from tqdm import tqdm

import peira

# -----------------------------------------------------------------------------
# hyperparameters (defaults: the preprint's ImageNet recipe)

parser = argparse.ArgumentParser(description="PEIRA on ImageNet-1k", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--data", required=True, help="ImageFolder root holding train/ and val/")
parser.add_argument("--out", default="out/imagenet", help="output folder (a checkpoint there is resumed)")
parser.add_argument("--loss", default="peira", choices=["peira", "vicreg"])
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=2048, help="global batch per optimiser step")
parser.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimiser step and rank")
parser.add_argument("--lr", type=float, default=2.4, help="peak LARS learning rate")
parser.add_argument("--min-lr", type=float, default=2e-3, help="learning rate at the end of the cosine")
parser.add_argument("--wd", type=float, default=1e-6)
parser.add_argument("--warmup-epochs", type=float, default=10)
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
parser.add_argument("--lam", type=float, default=0.1)
parser.add_argument("--eta-start", type=float, default=0.9)
parser.add_argument("--eta-end", type=float, default=0.5)
parser.add_argument("--proj", default="8192-8192-256", help="projector widths, last = embedding dim k")
parser.add_argument("--image-size", type=int, default=224, help="crop size (small values for tests)")
parser.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1), help="loader workers per rank")
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--stop-after", type=int, default=0, help="exit after this many epochs of this run (0: run to --epochs)")
parser.add_argument("--eval", metavar="CKPT", help="offline linear probe of a checkpoint, then exit")
parser.add_argument("--probe-epochs", type=int, default=100)
parser.add_argument("--probe-lr", type=float, default=0.25)
parser.add_argument("--probe-batch", type=int, default=1024)
parser.add_argument("--seed", type=int, default=0)

VICREG_COEFFS = (25.0, 25.0, 1.0)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# distributed set-up


def setup_distributed():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


# -----------------------------------------------------------------------------
# data: ImageFolder, the VICReg/BYOL asymmetric two-view recipe

def check_layout(root):
    """train/ and val/ with the same class folders, or one clear error."""
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            sys.exit(f"{path} not found: --data must hold ImageFolder train/ and val/ folders, one "
                     f"sub-folder of images per class (e.g. train/n01440764/*.JPEG)")
        if not any(e.is_dir() for e in os.scandir(path)):
            sys.exit(f"{path} has no class folders: expected {path}/<class>/<image files>")


def read_rgb(path):
    """uint8 (3, H, W), whatever the file's channels (grayscale and CMYK JPEGs exist in ImageNet)."""
    return torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)


def view_transform(size, blur_p, solarize_p):
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(23 if size >= 64 else 3, sigma=(0.1, 2.0))], p=blur_p),
        v2.RandomSolarize(128, p=solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform(size):
    return v2.Compose([v2.Resize(int(size * 256 / 224), antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


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
    """Centre crops of a split, sharded across ranks (no padding: every image once)."""
    ds = torchvision.datasets.ImageFolder(root, transform=eval_transform(size), loader=read_rgb)
    idx = list(range(rank, len(ds), world))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


# -----------------------------------------------------------------------------
# model

def build_model(proj_spec):
    """torchvision ResNet-50 (fc removed) and the projector (Linear-BN-ReLU ×2, Linear)."""
    backbone = torchvision.models.resnet50()
    backbone.fc = nn.Identity()
    dims = [2048] + [int(d) for d in proj_spec.split("-")]
    layers = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.ModuleDict({"backbone": backbone, "projector": nn.Sequential(*layers)})


def embed(model, x1, x2):
    h = model["backbone"](torch.cat([x1, x2]))
    return h, model["projector"](h)


class Encoder(nn.Module):  # the forward that DDP wraps
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x1, x2):
        return embed(self.model, x1, x2)


def vicreg_loss(z, world):
    """Official VICReg on the global batch (all_gather with gradient)."""
    z1, z2 = z.float().chunk(2)
    inv = F.mse_loss(z1, z2)
    if world > 1:
        z1, z2 = torch.cat(all_gather_with_grad(z1)), torch.cat(all_gather_with_grad(z2))
    n, d = z1.shape
    var = cov = 0
    for zz in (z1, z2):
        zz = zz - zz.mean(0)
        var = var + F.relu(1 - torch.sqrt(zz.var(0) + 1e-4)).mean() / 2
        c = zz.T @ zz / (n - 1)
        cov = cov + (c.square().sum() - c.diagonal().square().sum()) / d
    a, b, g = VICREG_COEFFS
    return a * inv + b * var + g * cov


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio; biases and norms (ndim ≤ 1) get neither
    weight decay nor the trust ratio."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, dn = p.norm(), d.norm()
                    d = d.mul(torch.where((pn > 0) & (dn > 0), g["trust"] * pn / dn, 1.0))
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def learning_rate(step, total, warmup, peak, floor):
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def backbone_features(model, loader, device, world):
    """Features and labels of a sharded clean loader, gathered on every rank."""
    model.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(model["backbone"](x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    model.train()
    f, y = torch.cat(feats), torch.cat(labels)
    if world > 1:  # shards differ in size by at most one: pad, gather, trim
        n = torch.tensor([len(f)], device=device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        m = int(max(s.item() for s in sizes))
        fp, yp = torch.zeros(m, f.shape[1], device=device), torch.zeros(m, dtype=y.dtype, device=device)
        fp[:len(f)], yp[:len(y)] = f, y
        fs, ys = [torch.empty_like(fp) for _ in range(world)], [torch.empty_like(yp) for _ in range(world)]
        dist.all_gather(fs, fp)
        dist.all_gather(ys, yp)
        f = torch.cat([a[:int(s.item())] for a, s in zip(fs, sizes)])
        y = torch.cat([a[:int(s.item())] for a, s in zip(ys, sizes)])
    return f, y


def linear_probe(train_f, train_y, val_f, val_y, classes, args):
    """Linear classifier on frozen (centre-crop) features: SGD, cosine, wd 1e-6; top-1, top-5."""
    gen = torch.Generator().manual_seed(args.seed)
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


def evaluate_checkpoint(args, rank, world, device):
    ckpt = torch.load(args.eval, map_location="cpu", weights_only=True)
    model = build_model(ckpt["config"]["proj"]).to(device)
    model.load_state_dict(ckpt["model"])
    loaders = [clean_loader(os.path.join(args.data, s), args.image_size, 256, args.workers, rank, world) for s in ("train", "val")]
    (trf, trl), (vaf, val) = (backbone_features(model, ld, device, world) for ld in loaders)
    classes = len(loaders[0].dataset.dataset.classes)
    top1, top5 = linear_probe(trf, trl, vaf, val, classes, args)
    if rank == 0:
        print(f"{args.eval} (epoch {ckpt['epoch']}): linear probe top-1 {100 * top1:.2f}%  top-5 {100 * top5:.2f}%")
    return {"top1": top1, "top5": top5, "epoch": ckpt["epoch"]}


# -----------------------------------------------------------------------------
# training

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parser.parse_args(argv)
    if not args.lam > 0 or not (0 < args.eta_end <= 1 and 0 < args.eta_start <= 1):
        parser.error("need --lam > 0 and --eta-start, --eta-end in (0, 1]")
    check_layout(args.data)
    rank, world, device = setup_distributed()
    master = rank == 0
    if args.eval:
        return evaluate_checkpoint(args, rank, world, device)
    micro = args.batch_size // (world * args.accum_steps)
    if micro * world * args.accum_steps != args.batch_size or micro < 2:
        parser.error(f"--batch-size {args.batch_size} must split into {world} ranks × {args.accum_steps} "
                     f"micro-batches of at least 2 images")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if master:
        os.makedirs(args.out, exist_ok=True)

    dataset = TwoViews(os.path.join(args.data, "train"), args.image_size, args.seed)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, world, rank, seed=args.seed, drop_last=True)
    val_loader = clean_loader(os.path.join(args.data, "val"), args.image_size, 256, args.workers, rank, world)
    classes = len(dataset.folder.classes)
    steps_per_epoch = len(sampler) // (micro * args.accum_steps)
    if steps_per_epoch == 0:
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(dataset)} training images")
    total_steps = args.epochs * steps_per_epoch

    torch.manual_seed(args.seed)
    model = build_model(args.proj).to(device).to(memory_format=torch.channels_last)
    probe = nn.Linear(2048, classes).to(device)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    k = int(args.proj.split("-")[-1])
    peira_loss = peira.PEIRALoss(k, lam=args.lam, eta=args.eta_start).to(device)  # loss, or monitor for vicreg
    opt = LARS(model.parameters(), lr=args.lr, weight_decay=args.wd)
    probe_opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    start_epoch = 0
    if os.path.isfile(ckpt_path):  # resume (after a preemption, or a --stop-after)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for name, obj in (("model", model), ("probe", probe), ("peira", peira_loss), ("opt", opt), ("probe_opt", probe_opt)):
            obj.load_state_dict(ckpt[name])
        start_epoch = ckpt["epoch"]
        if master:
            print(f"resuming from {ckpt_path} at epoch {start_epoch}")
    if master:
        with open(os.path.join(args.out, "config.json"), "w") as fh:
            json.dump({**vars(args), "world_size": world}, fh, indent=1)
    encoder = Encoder(model)
    if world > 1:
        encoder = nn.parallel.DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(encoder) if args.compile else encoder
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    last_epoch = min(args.epochs, start_epoch + args.stop_after) if args.stop_after else args.epochs
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        dataset.epoch = epoch  # workers hold a copy of the dataset: a new loader each epoch
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro * args.accum_steps, sampler=sampler, drop_last=True,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
        t0, seen = time.time(), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not master, leave=False)
        for i, (x1, x2, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            lr = learning_rate(step, total_steps, int(args.warmup_epochs * steps_per_epoch), args.lr, args.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            eta = args.eta_start + (args.eta_end - args.eta_start) * step / max(total_steps - 1, 1)
            peira_loss.eta = 1 - (1 - eta) ** (1 / args.accum_steps)
            x1, x2, y = (t.to(device, non_blocking=True) for t in (x1, x2, y))
            x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            probe_opt.zero_grad(set_to_none=True)
            for j in range(args.accum_steps):  # micro-batch j: the images j, j + a, j + 2a, ...
                sl = slice(j, None, args.accum_steps)
                sync = nullcontext() if j == args.accum_steps - 1 or world == 1 else encoder.no_sync()
                with sync, autocast:
                    h, z = forward(x1[sl], x2[sl])
                    loss = peira_loss(*z.chunk(2)) if args.loss == "peira" else vicreg_loss(z, world)
                    probe_loss = F.cross_entropy(probe(h[:micro].detach().float()), y[sl])
                    if args.loss != "peira":
                        with torch.no_grad():
                            peira_loss(*z.detach().float().chunk(2))
                    ((loss + probe_loss) / args.accum_steps).backward()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"non-finite loss {loss_value} at step {step} (epoch {epoch + 1}); "
                                         f"the last good checkpoint, if any, is {ckpt_path}")
            if args.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            probe_opt.step()
            seen += len(x1)
            if master:
                rate = seen / (time.time() - t0)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s_gpu=f"{rate:.0f}")
                with open(os.path.join(args.out, "metrics.jsonl"), "a") as fh:
                    fh.write(json.dumps({"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr, "eta": eta}) + "\n")
        epoch_time = time.time() - t0
        # online probe on the validation set, PEIRA diagnostics
        vf, vy = backbone_features(model, val_loader, device, world)
        with torch.no_grad():
            probe_acc = (probe(vf).argmax(1) == vy).float().mean().item()
        n_check = peira_loss.N.clone()
        if world > 1:
            dist.all_reduce(n_check, op=dist.ReduceOp.MAX)
        assert torch.equal(n_check, peira_loss.N), "running moments differ across ranks"
        record = {"epoch": epoch + 1, "online_probe": probe_acc, "img_per_s_per_gpu": seen / epoch_time,
                  "epoch_time": epoch_time, **peira_loss.stats()}
        if master:
            print(f"epoch {epoch + 1}: loss {loss_value:.4f}  online probe {100 * probe_acc:.2f}%  "
                  f"objective {record['objective']:.4f}  {record['img_per_s_per_gpu']:.0f} img/s per GPU  "
                  f"{epoch_time / 60:.1f} min")
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "probe": probe.state_dict(),
                                        "peira": peira_loss.state_dict(), "opt": opt.state_dict(),
                                        "probe_opt": probe_opt.state_dict(), "epoch": epoch + 1,
                                        "config": vars(args)})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
