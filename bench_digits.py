"""A real-image SSL benchmark on a CPU (about 15 min a seed): PEIRA, SimSiam and VICReg, same budget.

    python bench_digits.py                                     # the three losses: table, figures
    python bench_digits.py --seeds 0,1,2                       # three training seeds (README's table)
    python bench_digits.py --validation --lams 0.03,0.1,0.3,0.7,1  # PEIRA's λ sweep on validation images

The images are the UCI handwritten digits that scikit-learn ships inside its package (1797 scans of
8×8 pixels, 10 classes; E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
Machine Learning Repository, 1998): nothing is downloaded. They are upsampled to 32×32
RGB and written in CIFAR-10's on-disk format (cifar-10-batches-py: data_batch_1..5, test_batch,
batches.meta), so that train_cifar.py trains on them unchanged with --data out/digits/data-test.
The split is stratified and fixed: 1497 training images, 300 test images; with --validation, 300
of the training images are held out instead and the test images are not written (tune there,
report on the test split).

Each run is `train_cifar.py --tiny --data ... --loss L --epochs E --subset 0` (in this process,
one after the other); the table reports, at the last epoch, kNN and online-probe accuracy on the
test images, the effective rank of N, the PEIRA objective (every loss is monitored with it), the
correlation over epochs between that objective and kNN, and the training time. Writes into --out
(SPLIT: test or validation): data-SPLIT/, runs-SPLIT/ (one folder per loss, λ and seed; a finished
run is reused), results_SPLIT.json, knn_by_epoch_SPLIT.png, alignment_by_epoch_SPLIT.png and, with
--lams, lam_sweep_SPLIT.png.
"""
import argparse
import json
import os
import pickle
import time

import numpy as np
import torch
import torch.nn.functional as F

import train_cifar

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--out", default="out/digits", help="output folder: data, runs, results, figures")
parser.add_argument("--losses", default="peira,simsiam,vicreg", help="comma-separated losses to compare")
parser.add_argument("--lams", default="", help="comma-separated PEIRA λ values to sweep (empty: no sweep)")
parser.add_argument("--epochs", type=int, default=20, help="epochs per run: the same budget for every loss")
parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
parser.add_argument("--test-size", type=int, default=300, help="test (and validation) images, stratified")
parser.add_argument("--validation", action="store_true",
                    help="hold out validation images from the training set and report on them (tuning)")

CLASSES = [str(d) for d in range(10)]


# -----------------------------------------------------------------------------
# data: scikit-learn's digits in CIFAR-10's on-disk format

def digits_as_cifar(size=32):
    """uint8 images (1797, 3, size, size) and labels: the 8×8 scans (17 grey levels) rescaled to
    0..255, upsampled bilinearly, grey copied to the three colour channels."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] * (255 / 16)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return x.contiguous(), torch.from_numpy(digits.target).long()


def stratified_split(labels, test_size, seed=0):
    """Indices (train, test): test_size images, as equal a share of each class as possible."""
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    test = []
    for i, c in enumerate(classes):
        members = (labels == c).nonzero().flatten()
        take = test_size // len(classes) + (i < test_size % len(classes))
        test.append(members[torch.randperm(len(members), generator=gen)[:take]])
    test = torch.cat(test)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test] = True
    train = (~is_test).nonzero().flatten()
    return train[torch.randperm(len(train), generator=gen)], test[torch.randperm(len(test), generator=gen)]


def write_cifar_format(root, train_x, train_y, test_x, test_y, classes):
    """root/cifar-10-batches-py as CIFAR-10's python version lays it out: five training batches,
    one test batch (dicts with 'data' (N, 3072) uint8, channel-major, and 'labels'), batches.meta."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)

    def dump(name, entry):
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump(entry, fh)

    for i, part in enumerate(np.array_split(np.arange(len(train_x)), 5)):
        dump(f"data_batch_{i + 1}", {"batch_label": f"training batch {i + 1} of 5",
                                     "data": train_x[part].reshape(len(part), -1).numpy(),
                                     "labels": train_y[part].tolist()})
    dump("test_batch", {"batch_label": "testing batch 1 of 1",
                        "data": test_x.reshape(len(test_x), -1).numpy(), "labels": test_y.tolist()})
    dump("batches.meta", {"label_names": list(classes), "num_vis": 3 * 32 * 32,
                          "num_cases_per_batch": -(-len(train_x) // 5)})
    return folder


def build_digits(root, test_size=300, validation=False):
    """Write the digits into root once (the split is fixed) and return the folder. With validation,
    the test batch holds test_size of the training images instead, and the test images are not
    written at all: tune there, report on the test split."""
    folder = os.path.join(root, "cifar-10-batches-py")
    split = {"test_size": test_size, "validation": validation}
    if os.path.exists(os.path.join(folder, "batches.meta")):
        with open(os.path.join(root, "split.json")) as fh:
            if json.load(fh) != split:
                raise SystemExit(f"{root} holds another split than {split}: use another --out")
        return folder
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "split.json"), "w") as fh:
        json.dump(split, fh)
    x, y = digits_as_cifar()
    train, test = stratified_split(y, test_size)
    if validation:
        part, val = stratified_split(y[train], test_size, seed=1)
        train, test = train[part], train[val]
    return write_cifar_format(root, x[train], y[train], x[test], y[test], CLASSES)


# -----------------------------------------------------------------------------
# runs: train_cifar.py --tiny on the digits, one per (loss, λ, seed); a finished run is reused

def run_label(loss, lam):
    return f"{loss} (λ {lam:g})" if loss.startswith("peira") else loss


def run_name(loss, lam, seed):
    return f"{loss}-lam{lam:g}-seed{seed}" if loss.startswith("peira") else f"{loss}-seed{seed}"


def train_run(data, out, loss, lam, seed, epochs):
    """One train_cifar.py run; returns its per-epoch records (metrics.jsonl). A run whose results.json
    exists with the same settings is read back instead of trained again."""
    argv = ["--tiny", "--subset", "0", "--workers", "0", "--data", data, "--out", out, "--loss", loss,
            "--lam", str(lam), "--seed", str(seed), "--epochs", str(epochs)]
    results = os.path.join(out, "results.json")
    config = os.path.join(out, "config.json")
    if os.path.exists(results) and os.path.exists(config):
        with open(config) as fh:
            saved = json.load(fh)
        now = train_cifar.parse_args(argv)
        train_cifar.check_args(now)  # the recipe's values, as saved
        if all(saved.get(k) == v for k, v in vars(now).items()):  # every setting this code knows
            print(f"{out}: finished run reused")
            return [r for r in train_cifar.metrics_records(os.path.join(out, "metrics.jsonl")) if "knn" in r]
    print(f"\n== {' '.join(argv)}")
    return train_cifar.main(argv)


def reference_knn(data, seed=0):
    """kNN accuracy without training: on the raw normalised pixels, and on the features of the
    --tiny network at its initialisation (the start of the runs with this seed)."""
    train_x, train_y, test_x, test_y = train_cifar.load_splits(data, 0)
    device = torch.device("cpu")
    pixels = [F.normalize(train_cifar.normalize_clean(x, device).flatten(1), dim=1)
              for x in (train_x, test_x)]
    torch.manual_seed(seed)
    tiny = train_cifar.TINY
    proj = [int(d) for d in tiny["proj"].split("-")]
    backbone = train_cifar.SSLModel("peira", tiny["width"], proj).backbone
    init = [F.normalize(train_cifar.features(backbone, x, device), dim=1) for x in (train_x, test_x)]
    return {"raw pixels": train_cifar.knn_accuracy(pixels[0], train_y, pixels[1], test_y),
            "network at initialisation": train_cifar.knn_accuracy(init[0], train_y, init[1], test_y)}


# -----------------------------------------------------------------------------
# table and figures

def summary(history):
    """Last-epoch numbers of one run, the change of kNN over the last half, corr(objective, kNN)."""
    last, half = history[-1], history[len(history) // 2 - 1]
    knn = [h["knn"] for h in history]
    return {"knn": last["knn"], "online_probe": last["online_probe"], "rank_N": last["rank_N"],
            "kept": last["kept"],
            "objective": last["objective"], "alignment": last["alignment"],
            "knn_last_half": last["knn"] - half["knn"],
            "objective_knn_corr": float(np.corrcoef([h["objective"] for h in history], knn)[0, 1]),
            "train_time_s": float(sum(h["epoch_time"] for h in history))}


def mean_of(rows, key):
    return float(np.mean([r[key] for r in rows]))


def print_table(groups, references):
    """groups: {label: [summary per seed]}; one row per label, seed means."""
    print("\n| run | seeds | kNN (%) | online probe (%) | kNN change, last half (pts) | rank(N) | kept | "
          "PEIRA objective | corr(objective, kNN) | alignment | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, rows in groups.items():
        print(f"| {label} | {len(rows)} | {100 * mean_of(rows, 'knn'):.1f} | "
              f"{100 * mean_of(rows, 'online_probe'):.1f} | {100 * mean_of(rows, 'knn_last_half'):+.1f} | "
              f"{mean_of(rows, 'rank_N'):.1f} | {mean_of(rows, 'kept'):.2f} | "
              f"{mean_of(rows, 'objective'):.3f} | "
              f"{mean_of(rows, 'objective_knn_corr'):+.2f} | {mean_of(rows, 'alignment'):.3f} | "
              f"{mean_of(rows, 'train_time_s'):.0f} |")
    for label, knn in references.items():
        print(f"| {label} (no training) | — | {100 * knn:.1f} | | | | | | | | |")


def plot_by_epoch(histories, key, ylabel, path, scale=1.0, dashed_key=None):
    """One line per run label (seed mean) of a per-epoch metric; dashed_key, if given, is drawn
    dashed in the same colour (the online probe next to kNN)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (label, runs) in enumerate(histories.items()):
        values = np.mean([[scale * h[key] for h in run] for run in runs], axis=0)
        epochs = range(1, len(values) + 1)
        ax.plot(epochs, values, marker="o", ms=3, color=f"C{i}", label=label)
        if dashed_key is not None:
            dashed = np.mean([[scale * h[dashed_key] for h in run] for run in runs], axis=0)
            ax.plot(epochs, dashed, ls="--", color=f"C{i}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lam_sweep(lams, rows, path):
    """kNN accuracy and effective rank of N at the last epoch against λ (seed means)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(lams, [100 * mean_of(r, "knn") for r in rows], marker="o", label="kNN (%)")
    ax.plot(lams, [100 * mean_of(r, "online_probe") for r in rows], marker="s", label="online probe (%)")
    ax.set(xscale="log", xlabel="λ", ylabel="accuracy (%)")
    twin = ax.twinx()
    twin.plot(lams, [mean_of(r, "rank_N") for r in rows], marker="^", color="C3", label="rank(N)")
    twin.set_ylabel("effective rank of N", color="C3")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        lams = [float(x) for x in args.lams.split(",") if x]
    except ValueError:
        parser.error(f"--seeds takes integers and --lams numbers, comma-separated (got {args.seeds!r}, "
                     f"{args.lams!r})")
    losses = [x for x in args.losses.split(",") if x]
    unknown = [x for x in losses if x not in train_cifar.RECIPES]
    if unknown or args.epochs < 2 or not 0 < args.test_size < 1497:
        parser.error(f"--losses from {', '.join(train_cifar.RECIPES)} (got {args.losses!r}), --epochs ≥ 2 "
                     f"(got {args.epochs}), --test-size in 1..1496 (got {args.test_size})")
    split = "validation" if args.validation else "test"
    data = os.path.join(args.out, f"data-{split}")
    build_digits(data, args.test_size, validation=args.validation)
    runs_dir = os.path.join(args.out, f"runs-{split}")
    t0 = time.time()

    # the losses at the default λ, then the λ sweep; every run the same budget
    default_lam = train_cifar.parse_args(["--tiny"]).lam  # λ of a --tiny run
    compared = [run_label(loss, default_lam) for loss in losses]
    histories = {}
    for loss, lam in [(loss, default_lam) for loss in losses] + [("peira", lam) for lam in lams]:
        if run_label(loss, lam) not in histories:
            histories[run_label(loss, lam)] = [
                train_run(data, os.path.join(runs_dir, run_name(loss, lam, s)), loss, lam, s, args.epochs)
                for s in seeds]
    groups = {label: [summary(h) for h in runs] for label, runs in histories.items()}

    # table and figures
    references = reference_knn(data, seeds[0])
    print(f"\ndigits, {split} split, {args.epochs} epochs, seeds {args.seeds}, {time.time() - t0:.0f} s")
    print_table(groups, references)
    by_loss = {label: histories[label] for label in compared}
    plot_by_epoch(by_loss, "knn", "kNN (solid), online probe (dashed), %",
                  os.path.join(args.out, f"knn_by_epoch_{split}.png"), scale=100, dashed_key="online_probe")
    plot_by_epoch(by_loss, "alignment", "alignment of P with S",
                  os.path.join(args.out, f"alignment_by_epoch_{split}.png"))
    if lams:
        plot_lam_sweep(lams, [groups[run_label("peira", lam)] for lam in lams],
                       os.path.join(args.out, f"lam_sweep_{split}.png"))
    with open(os.path.join(args.out, f"results_{split}.json"), "w") as fh:
        json.dump({"split": split, "epochs": args.epochs, "seeds": seeds, "references_knn": references,
                   "runs": groups}, fh, indent=1)
    return groups


if __name__ == "__main__":
    main()
