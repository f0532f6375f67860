"""Training speed of each loss on the same model and batch (train_cifar.py's model and losses).

    python bench.py                                              # CPU: small ResNet-18, batch 64
    python bench.py --width 64 --batch-size 256 --bf16 --compile # GPU: PEIRA's CIFAR-10 set-up

Reports per loss: images/s (an image = its two views), time of a training step, time of the loss
alone (forward + backward on the step's embeddings), its share of the step, and peak GPU memory.
Target (GPU, ResNet-18, batch 256, k 1024): PEIRA's step within 3% of SimSiam's. PEIRA's CIFAR-10
set-up is that of the PEIRA preprint (arXiv:2605.17671, 2026).
"""
import argparse
import time
from contextlib import nullcontext

import torch

import peira
import train_cifar as tc

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--batch-size", type=int, default=64, help="images per step (each gives two views)")
parser.add_argument("--width", type=int, default=32, help="ResNet-18 base width (64 = standard)")
parser.add_argument("--proj", default="2048-2048-1024", help="projector widths, last = k")
parser.add_argument("--steps", type=int, default=7, help="timed steps per loss (the median is reported)")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loss (compilation, caches)")
LOSSES = ("peira", "peira_direct", "simsiam", "vicreg")
parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated, from " + ", ".join(LOSSES))
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


def bench_loss(name, args, device):
    """Times a training step, and the loss alone, of one loss on a fixed random batch."""
    proj = [int(d) for d in args.proj.split("-")]
    torch.manual_seed(0)
    model = tc.SSLModel(name, args.width, proj).to(device).to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if args.compile else model
    opt = tc.LARS(model.parameters(), lr=1e-3, weight_decay=1e-4)
    peira_loss = peira.PEIRALoss(proj[-1], lam=LAM, eta=0.5).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    x1, x2 = (torch.randn(args.batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
              for _ in range(2))

    def train_step():
        with autocast:
            _, z1, z2, p1, p2 = fwd(x1, x2)
            loss = tc.ssl_loss(name, z1, z2, p1, p2, peira_loss, lam=LAM, world=1)  # one process
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

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
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"loss": name, "img_per_s": args.batch_size / step_s, "step_ms": 1e3 * step_s,
            "loss_ms": 1e3 * loss_s, "loss_share": loss_s / step_s, "peak_gib": peak}


def main(argv=None):
    args = parser.parse_args(argv)
    unknown = [name for name in args.losses.split(",") if name not in LOSSES]
    if unknown:
        parser.error(f"--losses: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(LOSSES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads; ResNet-18 width "
          f"{args.width}, batch {args.batch_size}, projector {args.proj}, bf16 {args.bf16}, "
          f"compile {args.compile}")
    rows = [bench_loss(name, args, device) for name in args.losses.split(",")]
    ref = next((r for r in rows if r["loss"] == "simsiam"), rows[0])
    print("\n| loss | img/s | step (ms) | loss fwd+bwd (ms) | loss share | peak mem (GiB) | step vs "
          + ref["loss"] + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | {r['loss_ms']:.2f} | "
              f"{100 * r['loss_share']:.1f}% | {r['peak_gib']:.2f} | "
              f"{100 * (r['step_ms'] / ref['step_ms'] - 1):+.1f}% |")
    return rows


if __name__ == "__main__":
    main()
