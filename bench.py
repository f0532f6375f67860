"""Speed: PEIRA's loss against its explicit formula, the data pipeline, and each loss's training step.

    python bench.py                                              # CPU: the four tables, about 5 min
    python bench.py --tables loss,augment                        # some of them
    python bench.py --width 64 --batch-size 256 --bf16 --compile # GPU: PEIRA's CIFAR-10 set-up

Tables (the same on a GPU, timed with synchronisation; times are medians):
  loss        PEIRA's loss, forward + backward with the moment update, at k × B: the explicit formula
              (moment sums by three products, Q = (N + λI)⁻¹ by cholesky_inverse, P = S Q, aux_loss) and
              peira.PEIRALoss (one Cholesky factor and solves) side by side.
  augment     views per second of torchvision's per-image pipeline (train_cifar.ssl_augment, one view
              at a time), train_cifar.augment_batch on batches of --aug-batch, and an epoch's pipeline
              (train_cifar.batched_epoch: both views of AUG_STEPS steps a call on a GPU, of one on a CPU),
              on one thread and on all.
  throughput  training images per second of a train_cifar.py --tiny run (width 16, projector 128-128-64,
              1024 images, batch 128), whole epochs fed by each pipeline: --augment per-image (DataLoader,
              2 workers started every epoch) and --augment batched.
  step        per loss, on the model of --width, --proj, --batch-size: a training step, the loss alone
              and its share of the step, peak GPU memory; for the baselines, the PEIRA monitor's moment
              update timed alone, as a share of the step.
PEIRA's CIFAR-10 set-up is that of the PEIRA preprint (arXiv:2605.17671, 2026).
"""
import argparse
import math
import time
from contextlib import nullcontext

import torch

import peira
import train_cifar as tc

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
TABLES = ("loss", "augment", "throughput", "step")
parser.add_argument("--tables", default=",".join(TABLES), help="comma-separated, from " + ", ".join(TABLES))
parser.add_argument("--batch-size", type=int, default=64, help="step table: images per step (two views each)")
parser.add_argument("--width", type=int, default=32, help="step table: ResNet-18 base width (64 = standard)")
parser.add_argument("--proj", default="2048-2048-1024", help="step table: projector widths, last = k")
parser.add_argument("--steps", type=int, default=7, help="timed repetitions (the median is reported)")
parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions (compilation, caches)")
LOSSES = ("peira", "peira_direct", "simsiam", "vicreg")
parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated, from " + ", ".join(LOSSES))
parser.add_argument("--ks", default="256,1024,2048,8192", help="loss table: embedding dimensions k")
parser.add_argument("--batches", default="256,512", help="loss table: batch sizes B")
parser.add_argument("--aug-batch", type=int, default=256, help="augment table: views per batch")
parser.add_argument("--throughput-epochs", type=int, default=2, help="throughput table: timed epochs")
parser.add_argument("--throughput-images", type=int, default=tc.TINY["subset"],
                    help="throughput table: images")
parser.add_argument("--throughput-batch", type=int, default=tc.TINY["batch_size"],
                    help="throughput table: batch")
parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
LAM = tc.parser.get_default("lam")  # PEIRA's λ, train_cifar.py's (0.7)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps, device):
    """Median seconds of a call (robust to a busy CPU)."""
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# -----------------------------------------------------------------------------
# loss: the explicit formula against PEIRALoss

def explicit_peira_loss(u, v, N, S, lam, eta):
    """PEIRALoss's training step as peira.py computed it before (commit c9d5374): moment sums by three
    products gathered into one vector (its all-reduce buffer), a finiteness check on the host,
    running moments, then Q = (N + λI)⁻¹ by cholesky_inverse, P = S Q, and aux_loss with them."""
    with torch.no_grad():
        k, uv = u.shape[1], u.T @ v
        sums = (u.T @ u + v.T @ v, uv + uv.T, u.sum(0), v.sum(0))
        flat = torch.cat([s.flatten() for s in sums] + [sums[2].new_tensor([len(u)])])
        if not torch.isfinite(flat[:k * k]).all():
            raise FloatingPointError("non-finite embeddings")
        n = flat[-1]
        N.lerp_(flat[:k * k].view(k, k) / n, eta)
        S.lerp_(flat[k * k:2 * k * k].view(k, k) / n, eta)
    P, Q = peira.optimal_regressor(N, S, lam)  # Cholesky, cholesky_inverse, S Q
    return peira.aux_loss(u, v, P, Q, lam)


def bench_loss(k, batch, args, device):
    """Forward + backward of the explicit formula and of PEIRALoss on the same embeddings (ms)."""
    gen = torch.Generator(device=device).manual_seed(0)
    u, v = (torch.randn(batch, k, generator=gen, device=device).requires_grad_() for _ in range(2))
    peira_loss = peira.PEIRALoss(k, lam=LAM, eta=0.5).to(device)
    peira_loss(u, v)  # both start from the same running moments
    N, S = peira_loss.N.clone(), peira_loss.S.clone()
    steps = args.steps if k < 4096 else 3  # k 8192 on a CPU: seconds per call
    row = {"k": k, "B": batch}
    for name, loss_fn in (("explicit", lambda: explicit_peira_loss(u, v, N, S, LAM, 0.5)),
                          ("peira", lambda: peira_loss(u, v))):
        try:
            for _ in range(args.warmup if k < 4096 else min(args.warmup, 1)):
                loss_fn().backward()
            row[name] = 1e3 * timed(lambda: loss_fn().backward(), steps, device)
        except torch.OutOfMemoryError:
            row[name] = float("nan")
            torch.cuda.empty_cache()
    return row


def loss_table(args, device):
    rows = [bench_loss(int(k), int(b), args, device)
            for k in args.ks.split(",") for b in args.batches.split(",")]
    print("\n| k | B | explicit formula (ms) | PEIRALoss (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['B']} | {r['explicit']:.1f} | {r['peira']:.1f} | "
              f"{r['explicit'] / r['peira']:.2f}× |")
    return rows


# -----------------------------------------------------------------------------
# augment and throughput: the per-image pipeline against the batched one

def random_images(n, device, seed=0):
    """uint8 CIFAR-sized images (the pipelines' cost does not depend on the content)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)


def augment_table(args, device):
    """Views per second of each pipeline, on one thread and on all of them."""
    images = random_images(args.aug_batch, device)
    pool = random_images(2 * tc.AUG_STEPS * args.aug_batch, device, seed=1)  # two chunks of an epoch
    labels = torch.zeros(len(pool), dtype=torch.long, device=device)
    per_image = tc.ssl_augment()
    gen = torch.Generator(device=device).manual_seed(0)
    threads = torch.get_num_threads()
    rows = []
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        row = {"threads": n_threads}
        row["per_image"] = args.aug_batch / timed(lambda: [per_image(x) for x in images], 3, device)
        batched = lambda: tc.augment_batch(images, tc.sample_view_params(args.aug_batch, gen))  # noqa: E731
        batched()
        row["batched"] = args.aug_batch / timed(batched, args.steps, device)
        # what an epoch runs: batched_epoch, both views of AUG_STEPS steps per call on a GPU, 1 on a CPU
        epoch = lambda: list(tc.batched_epoch(pool, labels, 0, 0, args.aug_batch, 0, 1))  # noqa: E731
        epoch()
        row["epoch"] = 2 * len(pool) / timed(epoch, max(1, args.steps // 3), device)
        rows.append(row)
    torch.set_num_threads(threads)
    chunk = tc.augment_steps(device)
    print(f"\n| threads | per-image views/s | batched views/s (batch {args.aug_batch}) | ratio | "
          f"an epoch's views/s (batched_epoch, {chunk} steps a call) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['per_image']:.0f} | {r['batched']:.0f} | "
              f"{r['batched'] / r['per_image']:.1f}× | {r['epoch']:.0f} |")
    return rows


def throughput_table(args, device):
    """Training images per second of the --tiny run (its model, batch and 1024 images), whole epochs
    with the data pipeline included (the per-image one starts its workers every epoch), per loss."""
    tiny = tc.TINY
    batch, proj = args.throughput_batch, [int(d) for d in tiny["proj"].split("-")]
    images = random_images(args.throughput_images, "cpu")
    labels = torch.arange(len(images)) % 10
    rows = []
    for name in args.losses.split(","):
        row = {"loss": name}
        for pipeline in ("per-image", "batched"):
            torch.manual_seed(0)
            model = tc.SSLModel(name, tiny["width"], proj).to(device)
            opt = tc.LARS(model.parameters(), lr=1e-3, weight_decay=1e-4)
            peira_loss = peira.PEIRALoss(proj[-1], lam=tiny["lam"], eta=0.5).to(device)
            on_device = images.to(device), labels.to(device)
            warm = next(iter(tc.batched_epoch(*on_device, 0, 0, batch, 0, 1)))  # cuDNN's tuning, untimed
            tc.train_step(model, None, model, None, peira_loss, (opt, None), warm, name, tiny["lam"], 0.5, 1,
                          0.0, 1, nullcontext())
            sync(device)
            t0 = time.perf_counter()
            for epoch in range(args.throughput_epochs):
                if pipeline == "batched":
                    batches = tc.batched_epoch(*on_device, 0, epoch, batch, 0, 1)
                else:
                    batches = tc.epoch_loader(tc.TwoViews(images, labels, 0), epoch, batch, 0, 1,
                                              tiny["workers"], device.type == "cuda")
                for b in batches:
                    b = [t.to(device, non_blocking=True) for t in b]
                    tc.train_step(model, None, model, None, peira_loss, (opt, None), b, name, tiny["lam"],
                                  0.5, 1, 0.0, 1, nullcontext())
            sync(device)
            steps = args.throughput_epochs * (len(images) // batch)
            row[pipeline] = batch * steps / (time.perf_counter() - t0)
        rows.append(row)
    print(f"\n| loss | per-image pipeline (img/s) | batched pipeline (img/s) | ratio |  ← --tiny: "
          f"{len(images)} images, batch {batch}, {args.throughput_epochs} epochs")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['per-image']:.0f} | {r['batched']:.0f} | "
              f"{r['batched'] / r['per-image']:.2f}× |")
    return rows


# -----------------------------------------------------------------------------
# step: each loss's training step, the loss's share, the monitor's cost

def bench_step(name, args, device):
    """Times a training step, the loss alone, and for the baselines the PEIRA monitor's moment update
    alone, on a fixed random batch."""
    proj = [int(d) for d in args.proj.split("-")]
    torch.manual_seed(0)
    model = tc.SSLModel(name, args.width, proj).to(device).to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if args.compile else model
    opt = tc.LARS(model.parameters(), lr=1e-3, weight_decay=1e-4)
    peira_loss = peira.PEIRALoss(proj[-1], lam=LAM, eta=0.5).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    x1, x2 = (torch.randn(args.batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
              for _ in range(2))
    y = torch.zeros(args.batch_size, dtype=torch.long, device=device)

    def train_step():
        tc.train_step(fwd, None, model, None, peira_loss, (opt, None), (x1, x2, y), name, LAM, 0.5, 1, 0.0, 1,
                      autocast)

    with autocast:  # z1, z2, p1, p2 of this batch (p: SimSiam's predictions), to time the loss alone
        embeddings = [t.detach().requires_grad_() if t is not None else None for t in model(x1, x2)[1:]]

    def loss_step():
        with autocast:
            loss = tc.ssl_loss(name, *embeddings, peira_loss, lam=LAM, world=1)
        loss.backward()

    for _ in range(args.warmup):
        train_step()
        loss_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(train_step, args.steps, device)
    loss_s = timed(loss_step, args.steps, device)
    z1, z2 = (t.detach().float() for t in embeddings[:2])
    monitor_s = timed(lambda: peira_loss.update(z1, z2, all_reduce=False), args.steps, device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    row = {"loss": name, "img_per_s": args.batch_size / step_s, "step_ms": 1e3 * step_s,
           "loss_ms": 1e3 * loss_s, "loss_share": loss_s / step_s, "peak_gib": peak,
           "monitor_share": float("nan")}
    if name != "peira":  # the baselines' PEIRA monitor: its moment update (PEIRA's loss is its own monitor)
        row["monitor_share"] = monitor_s / step_s
    return row


def step_table(args, device):
    rows = [bench_step(name, args, device) for name in args.losses.split(",")]
    ref = next((r for r in rows if r["loss"] == "simsiam"), rows[0])
    print(f"\n| loss | img/s | step (ms) | loss fwd+bwd (ms) | loss share | PEIRA monitor's update | "
          f"peak mem (GiB) | step vs {ref['loss']} |  ← width {args.width}, batch {args.batch_size}, "
          f"projector {args.proj}")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = "—" if math.isnan(r["monitor_share"]) else f"{100 * r['monitor_share']:.2f}% of the step"
        print(f"| {r['loss']} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {r['loss_ms']:.2f} | "
              f"{100 * r['loss_share']:.1f}% | {share} | {r['peak_gib']:.2f} | "
              f"{100 * (r['step_ms'] / ref['step_ms'] - 1):+.1f}% |")
    return rows


def main(argv=None):
    args = parser.parse_args(argv)
    unknown = [name for name in args.losses.split(",") if name not in LOSSES]
    if unknown:
        parser.error(f"--losses: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(LOSSES)}")
    tables = args.tables.split(",")
    if any(t not in TABLES for t in tables):
        parser.error(f"--tables: choose from {', '.join(TABLES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train_cifar.py: fixed shapes
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 {args.bf16}, "
          f"compile {args.compile}")
    runs = {"loss": loss_table, "augment": augment_table, "throughput": throughput_table, "step": step_table}
    return {name: runs[name](args, device) for name in tables}


if __name__ == "__main__":
    main()
