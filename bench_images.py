"""Real-image SSL benchmark on a CPU: PEIRA, SimSiam and VICReg on CIFAR-10 (or digits), one budget.

    python bench_images.py --data DIR --tune             # validation split: each loss's trials, the choice
    python bench_images.py --data DIR --seeds 0,1,2      # test images: the chosen settings, table, figures
    python bench_images.py --data DIR --lam-sweep        # validation split: PEIRA against λ, the λ figure
    python bench_images.py --dataset digits --tune       # the same on scikit-learn's digits (no download)
    python bench_images.py --data DIR --compare-augment --epochs 5   # batched views vs per-image, same seeds
    python bench_images.py --data DIR --trial '{"loss": "vicreg", "lr": 3.0, "proj": "128-128-64"}'  # one run

DIR holds CIFAR-10 as train_cifar.py reads it: torchvision's cifar-10-batches-py, or an image folder
(train/<class>/*.jpg, test/<class>/*.jpg). The benchmark writes its splits once, in CIFAR-10's on-disk
format, into --out: a class-balanced training subset of --train-size images; for --tune, --lam-sweep
and --trial, --val-size other training images as validation split (the test images are not written);
otherwise the 10,000 test images. Every run is `train_cifar.py` with the same CPU setting (SETTING:
width, projector, batch, epochs, augmentations) and its loss's own objective and optimiser; a finished
run is reused.

--tune runs TRIALS on the validation split (seed 0): the same number of trials for every loss (its
learning rate; PEIRA's η and VICReg's coefficients), and writes tuned.json: each loss's trial with the
best offline linear probe (trials within TIE_MARGIN of their loss's best run again with seed 1, and
the mean of both seeds chooses among them). Without --tune the runs use tuned.json and report, on the
test images: the offline linear probe on frozen features (primary; 100 epochs of SGD on the backbone
features standardised with the training features' mean and std), kNN (cosine, k 20 and T 0.07 as
solo-learn; k 200 and T 0.1 as InstDisc), the kNN monitor of the first and last epoch, rank(N),
the directions the training images show above their null, corr(PEIRA objective, test kNN) over
epochs and P–S alignment; raw pixels and the untrained network (as training starts from it, and with
its residual branches drawn too) through the same kNN and probe; per loss mean ± std over seeds and
PEIRA − each baseline as paired differences with a 95% t interval. Writes results_SPLIT.json,
knn_by_epoch_SPLIT.png, objective_vs_knn_SPLIT.png and alignment_by_epoch_SPLIT.png. --lam-sweep runs
PEIRA at each λ of LAM_SWEEP (validation split, seed 0; never a candidate), reads the untrained
network's view correlations as train_cifar.py does before training, and writes results_lam_sweep.json
and lam_sweep.png.
--compare-augment trains PEIRA (λ 0.1) on the test split with both of train_cifar.py's pipelines
(--augment batched, per-image) on the same seeds and prints the paired differences. --trial runs one
configuration outside TRIALS on the validation split (never a candidate) and prints its row beside
the references; its evaluation stays in its run's folder (results_validation.json is the trials').

Digits: the UCI handwritten digits that scikit-learn ships (1797 scans of 8×8 pixels; E. Alpaydin and
C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine Learning Repository, 1998),
upsampled to 32×32 RGB; 300 test images, 300 validation images. CIFAR-10: A. Krizhevsky, "Learning
Multiple Layers of Features from Tiny Images", tech. report, University of Toronto, 2009.
"""
import argparse
import json
import math
import os
import pickle
import time

import numpy as np
import torch
import torch.nn.functional as F

import train_cifar

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "digits"])
parser.add_argument("--data", default="./data", help="CIFAR-10 (train_cifar.py --data); unused for digits")
parser.add_argument("--out", help="output folder (default out/bench_DATASET)")
mode = parser.add_mutually_exclusive_group()
mode.add_argument("--tune", action="store_true",
                  help="run every loss's trials on the validation split (seed 0)")
parser.add_argument("--seeds", help="comma-separated training seeds: the test split's (default 0,1,2) or "
                                   "--trial's (default 0); --tune chooses on seed 0 (near ties: 0 and 1)")
parser.add_argument("--losses", help="comma-separated losses to compare (default: peira,simsiam,vicreg)")
parser.add_argument("--train-size", type=int, help="training images (default: SETTING's)")
parser.add_argument("--epochs", type=int, help="epochs per run (default: SETTING's)")
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                    help="bf16 autocast (default: SETTING's)")
parser.add_argument("--probe-epochs", type=int, default=100, help="offline linear probe epochs")
mode.add_argument("--trial", metavar="JSON",
                    help='one configuration outside the trials, on the validation split (never a candidate), '
                         'e.g. \'{"loss": "vicreg", "lr": 3.0, "proj": "128-128-64"}\': train_cifar.py flags '
                         'over SETTING; its row beside the references')
mode.add_argument("--lam-sweep", action="store_true",
                  help="PEIRA at each λ of LAM_SWEEP on the validation split (seed 0): the λ figure")
mode.add_argument("--compare-augment", action="store_true",
                    help="test split: PEIRA (λ 0.1) with train_cifar's batched views and with torchvision's "
                         "per-image pipeline, same seeds: does the pipeline change accuracy?")

# the CPU setting, the same for every loss (train_cifar.py flags): README says what was measured before it.
# bf16: autocast in training and evaluation, about 2× faster on CPUs with AVX-512 BF16 or AMX, slower
# without them (--no-bf16). CIFAR-10's projector: 4× the representation (128 at width 16) in every layer,
# as solo-learn's CIFAR configs give VICReg and SimSiam on ResNet-18 (2048 on its 512); SimSiam's predictor
# is then 512-128-512, its k-k/4-k. The digits keep 128-128-64, the setting their λ runs were measured at
SETTING = {"cifar10": dict(train_size=10000, val_size=2000, epochs=10, width=16, proj="512-512-512",
                           batch=128, bf16=True),
           "digits": dict(train_size=1197, val_size=300, epochs=20, width=16, proj="128-128-64", batch=128,
                          bf16=True)}
# the trials of each loss on the validation split, the same number for every loss: its learning rate
# (LARS, convention --lars vicreg; SimSiam's SGD per 256 images, its recipe 0.03) and, for PEIRA and
# VICReg, the setting of the loss's own lever that the explorations after the first test runs found
# (README): PEIRA's running moments at η 1 throughout (the batch's moments alone), VICReg's invariance
# coefficient at 10 (its paper's 25). Each learning-rate grid has a worse trial on both sides of its
# best: PEIRA's and VICReg's grids, first 0.3 / 1 / 3 with 3 best, moved to 1 / 3 / 10; SimSiam's,
# 0.06 ... 0.48 with 0.48 best at projector 512-512-512, moved to 0.12 ... 0.96, then to 0.24 ... 1.92.
# Before commit 58761ad each loss had a fifth trial (PEIRA λ 0.03, VICReg solo-learn LARS lr 1.0,
# SimSiam lr 0.5 with wd 1e-5), each below its loss's best (README); dropped so that the benchmark fits
# two hours. The lever trials replaced PEIRA's λ 0.3 at lr 1.0 (which --lam-sweep still runs) and
# VICReg's solo-learn LARS at lr 0.3 (README: the LARS conventions)
TRIALS = {
    "peira": [{"lam": 0.1, "lr": 1.0}, {"lam": 0.1, "lr": 3.0}, {"lam": 0.1, "lr": 10.0},
              {"lam": 0.1, "lr": 3.0, "eta_start": 1.0, "eta_end": 1.0}],
    "vicreg": [{"lr": 1.0}, {"lr": 3.0}, {"lr": 10.0}, {"lr": 3.0, "vicreg_coeffs": "10,25,1"}],
    # SimSiam's predictor at a fixed learning rate (its recipe's; named here so that the trials say it)
    "simsiam": [{"lr_per_256": x, "fix_pred_lr": True} for x in (0.24, 0.48, 0.96, 1.92)],
}
# --lam-sweep: λ against rank and accuracy (the preprint: λ selects the effective dimension) at PEIRA's
# lr 1.0, on the validation split; never a candidate (the runs it shares with TRIALS are reused)
LAM_SWEEP, LAM_SWEEP_LR = (0.03, 0.1, 0.3, 0.5, 0.7), 1.0
# --tune's near ties: trials whose seed-0 probe is within TIE_MARGIN of their loss's best run again with
# TIE_SEED, and the mean over both seeds chooses. Two single runs differ by up to about 2 points by chance
# (the test runs' std over seeds is 0.4-1.1 points, so 0.6-1.6 for a difference: 2 points is about its
# 95% bound at the middle); added when SimSiam's two best trials came 0.7 points apart on seed 0 and the
# other way round on seed 1 (README)
TIE_MARGIN, TIE_SEED = 0.02, 1
KNN_SETTINGS = {"knn_k20": (20, 0.07), "knn_k200": (200, 0.1)}
# the runs' view correlations (train_cifar.py --view-corr-every): before training, after epoch 1, every 5
# epochs and after the last; each costs about a third of a training epoch, and the tables read the last
VIEW_CORR_EVERY = 5


# -----------------------------------------------------------------------------
# data: the splits, written once in CIFAR-10's on-disk format

def digits_as_cifar(size=32):
    """uint8 images (1797, 3, size, size) and labels: the 8×8 scans (17 grey levels) rescaled to
    0..255, upsampled bilinearly, grey copied to the three colour channels."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] * (255 / 16)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    return x.contiguous(), torch.from_numpy(digits.target).long()


def stratified_split(labels, size, seed=0):
    """Indices (rest, chosen): `size` images, as equal a share of each class as possible, and the rest."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for i, c in enumerate(labels.unique()):
        members = (labels == c).nonzero().flatten()
        take = size // 10 + (i < size % 10)
        chosen.append(members[torch.randperm(len(members), generator=gen)[:take]])
    chosen = torch.cat(chosen)
    is_chosen = torch.zeros(len(labels), dtype=torch.bool)
    is_chosen[chosen] = True
    rest = (~is_chosen).nonzero().flatten()
    return rest[torch.randperm(len(rest), generator=gen)], chosen[torch.randperm(len(chosen), generator=gen)]


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


def build_split(args, setting, split):
    """Write the split's data into --out once and return its folder: a class-balanced training subset,
    and the validation images (held out from the training images) or the test images."""
    root = os.path.join(args.out, f"data-{split}")
    key = {"dataset": args.dataset, "split": split, "train_size": setting["train_size"],
           "val_size": setting["val_size"]}
    if os.path.exists(os.path.join(root, "cifar-10-batches-py", "batches.meta")):
        with open(os.path.join(root, "split.json")) as fh:
            if json.load(fh) != key:
                raise SystemExit(f"{root} holds another split than {key}: use another --out")
        return root
    if args.dataset == "digits":
        x, y = digits_as_cifar()
        rest, test = stratified_split(y, 300)
        train_x, train_y, test_x, test_y = x[rest], y[rest], x[test], y[test]
        classes = [str(d) for d in range(10)]
    else:
        train_x, train_y, test_x, test_y = train_cifar.load_splits(args.data, 0)
        classes = train_cifar.CIFAR10_CLASSES
    rest, val = stratified_split(train_y, setting["val_size"], seed=1)
    if split == "validation":
        test_x, test_y = train_x[val], train_y[val]
    _, train = stratified_split(train_y[rest], setting["train_size"], seed=2)
    train = rest[train]  # never a validation image, whatever the split
    os.makedirs(root, exist_ok=True)
    write_cifar_format(root, train_x[train], train_y[train], test_x, test_y, classes)
    with open(os.path.join(root, "split.json"), "w") as fh:
        json.dump(key, fh)
    return root


# -----------------------------------------------------------------------------
# runs: one train_cifar.py run per (loss, trial, seed); offline evaluation of its checkpoint

def lam_sweep_runs():
    return [{"lam": lam, "lr": LAM_SWEEP_LR} for lam in LAM_SWEEP]


def parse_trial(text):
    """--trial's JSON: (loss, its train_cifar.py flags), or ValueError saying what is wrong. The
    benchmark's own settings (seed, output, data, subset, and what never changes a run) are refused."""
    try:
        trial = json.loads(text)
    except ValueError:
        raise ValueError(f"--trial takes a JSON object (got {text!r})") from None
    if not isinstance(trial, dict) or not isinstance(trial.get("loss"), str) or trial["loss"] not in TRIALS:
        raise ValueError(f"--trial needs a \"loss\" from {', '.join(TRIALS)} (got {text!r})")
    own = sorted(({"seed", "subset"} | train_cifar.NOT_RUN_KEYS) & set(trial))
    if own:
        raise ValueError(f"--trial: {', '.join(own)} are set by the benchmark")
    return trial.pop("loss"), trial


def trial_name(loss, trial):
    return "-".join([loss] + [f"{k}{v}" for k, v in sorted(trial.items())])


def run_argv(data, out, loss, trial, seed, setting):
    argv = ["--tiny", "--subset", "0", "--workers", "0", "--data", data, "--out", out, "--loss", loss,
            "--seed", str(seed), "--epochs", str(setting["epochs"]), "--width", str(setting["width"]),
            "--proj", setting["proj"], "--batch-size", str(setting["batch"]),
            "--bf16" if setting["bf16"] else "--no-bf16", "--view-corr-every", str(VIEW_CORR_EVERY)]
    for key, value in trial.items():
        if key == "lr_per_256":  # SimSiam's SGD learning rate scales with the batch
            key, value = "lr", value * trial.get("batch_size", setting["batch"]) / 256
        flag = "--" + key.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return argv


def train_run(argv):
    """One train_cifar.py run; its per-epoch records. A finished run (results.json, every epoch in
    metrics.jsonl, the same settings but those that never change a run, train_cifar.NOT_RUN_KEYS) is
    read back instead of trained again; anything else in its folder is cleared first, so that an
    interrupted run is never taken for a finished one."""
    out = argv[argv.index("--out") + 1]
    now = train_cifar.parse_args(argv)
    train_cifar.check_args(now)  # the recipe's values, as saved
    config, results = os.path.join(out, "config.json"), os.path.join(out, "results.json")
    if os.path.exists(results) and os.path.exists(config):
        with open(config) as fh:
            saved = json.load(fh)
        history = [r for r in train_cifar.metrics_records(os.path.join(out, "metrics.jsonl")) if "knn" in r]
        saved = train_cifar.with_added_settings(saved, vars(now))
        # a run resumed with --allow-change ran another schedule than its config.json now says
        ignored = train_cifar.NOT_RUN_KEYS - {"allow_change"}
        same = all(saved.get(k) == v for k, v in vars(now).items() if k not in ignored)
        if same and len(history) == now.epochs:
            return history
    for name in ("results.json", "evaluation.json"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    print(f"\n== train_cifar.py {' '.join(argv)}", flush=True)
    return train_cifar.main(argv)


PROBE_INPUT = "standardised"  # evaluation.json records it: a cached evaluation of another kind is redone


def evaluate(train_feat, train_y, test_feat, test_y, probe_epochs, seed=0):
    """Offline linear probe on features standardised with the training features' mean and std (so
    that its learning rate suits any scale, as the online probe's), and both kNN on L2-normalised
    features."""
    mean, std = train_feat.mean(0), train_feat.std(0).clamp_min(1e-6)
    top1, _ = train_cifar.linear_probe((train_feat - mean) / std, train_y, (test_feat - mean) / std, test_y,
                                       probe_epochs, seed)
    out = {"linear_probe": top1, "probe_input": PROBE_INPUT}
    train_feat, test_feat = F.normalize(train_feat, dim=1), F.normalize(test_feat, dim=1)
    for name, (k, t) in KNN_SETTINGS.items():
        out[name] = train_cifar.knn_accuracy(train_feat, train_y, test_feat, test_y, k=k, t=t)
    return out


def evaluate_run(out, splits, probe_epochs):
    """evaluate() of a run's final backbone on its data, splits = load_splits() of it (cached in
    out/evaluation.json)."""
    path = os.path.join(out, "evaluation.json")
    ckpt = train_cifar.read_checkpoint(os.path.join(out, "ckpt.pt"))
    if os.path.exists(path):
        with open(path) as fh:
            cached = json.load(fh)
        key = ("epoch", "probe_epochs", "config", "probe_input")
        if tuple(cached.get(k) for k in key) == (ckpt["epoch"], probe_epochs, ckpt["config"], PROBE_INPUT):
            return cached
    cfg = ckpt["config"]
    model = train_cifar.SSLModel(cfg["loss"], cfg["width"], [int(d) for d in cfg["proj"].split("-")],
                                 cfg.get("pred_hidden"))
    model.load_state_dict(ckpt["model"])
    result = {**backbone_evaluation(model.backbone, splits, probe_epochs, cfg["bf16"]),
              "epoch": ckpt["epoch"], "probe_epochs": probe_epochs, "config": cfg}
    with open(path, "w") as fh:
        json.dump(result, fh)
    return result


def backbone_evaluation(backbone, splits, probe_epochs, bf16):
    train_x, train_y, test_x, test_y = splits
    device = torch.device("cpu")
    feats = [train_cifar.features(backbone, x, device, bf16=bf16) for x in (train_x, test_x)]
    return evaluate(feats[0], train_y, feats[1], test_y, probe_epochs)


def references(splits, setting, probe_epochs, seed=0):
    """The scale, through evaluate(): raw normalised pixels; the network at initialisation, as
    training starts from it (each residual block its shortcut, --zero-init-residual) and with its
    residual branches drawn at random as well (a random ResNet-18)."""
    train_x, train_y, test_x, test_y = splits
    pixels = [train_cifar.normalize_clean(x, torch.device("cpu")).flatten(1) for x in (train_x, test_x)]
    refs = {"raw pixels": evaluate(pixels[0], train_y, pixels[1], test_y, probe_epochs)}
    for name, zero_init in (("network at initialisation", True),
                            ("network at initialisation, residual branches drawn", False)):
        torch.manual_seed(seed)
        backbone = train_cifar.ResNet18(setting["width"], zero_init)
        refs[name] = backbone_evaluation(backbone, splits, probe_epochs, setting["bf16"])
    return refs


def initial_views(splits, setting, seed=0, zero_init_residual=True):
    """train_cifar.view_correlations of the untrained network (seed `seed`) on the training images, as
    train_cifar.py reads them before its first step (on the device it would pick): the spectrum λ is
    checked against (lam_max), the correlations seen, and how many of them each λ of LAM_SWEEP keeps
    (s > λ²)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = train_cifar.SSLModel("peira", setting["width"], [int(d) for d in setting["proj"].split("-")],
                                 zero_init_residual=zero_init_residual)
    stats = train_cifar.view_correlations(model.to(device), splits[0], 0.0, seed, train_cifar.BEFORE_TRAINING,
                                          device, 0, 1, setting["bf16"], spectrum=True)
    stats.pop("kept_dims")  # at λ 0: every direction seen
    stats["kept_by_lam"] = {str(lam): sum(s > lam ** 2 for s in stats["corr_seen"]) for lam in LAM_SWEEP}
    return stats


def summary(history, evaluation):
    """One run: the offline evaluation, and the per-epoch monitor's first and last values."""
    first, last = history[0], history[-1]
    objective, knn = [h["objective"] for h in history], [h["knn"] for h in history]
    corr = math.nan
    if len(history) > 2 and np.std(objective) > 0:
        corr = float(np.corrcoef(objective, knn)[0, 1])
    return {**{k: evaluation[k] for k in ("linear_probe", *KNN_SETTINGS)}, "knn_first": first["knn"],
            "knn_last": last["knn"], "rank_N": last["rank_N"], "signal_dims": last["signal_dims"],
            "null_level": last["null_level"], "alignment_first": first["alignment"],
            "alignment_last": last["alignment"], "objective_knn_corr": corr,
            "train_time_s": float(sum(h["epoch_time"] for h in history))}


# -----------------------------------------------------------------------------
# statistics, table and figures

def mean_std(rows, key):
    values = np.array([r[key] for r in rows], float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def paired_difference(a, b, key):
    """Mean of the per-seed differences a − b and its 95% t interval (n − 1 degrees of freedom)."""
    from scipy.stats import t as student
    d = np.array([x[key] - y[key] for x, y in zip(a, b)], float)
    if len(d) < 2:
        return float(d.mean()), math.nan, math.nan
    half = student.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def print_table(groups, refs):
    cols = [("linear_probe", "linear probe"), ("knn_k20", "kNN k20"), ("knn_k200", "kNN k200"),
            ("knn_first", "kNN epoch 1"), ("knn_last", "kNN last epoch")]
    print("\n| run | seeds | " + " | ".join(f"{c} (%)" for _, c in cols)
          + " | rank(N) | directions seen | corr(objective, kNN) | alignment first → last | time (s) |")
    print("|---|---|" + "---|" * (len(cols) + 5))
    for label, rows in groups.items():
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in (mean_std(rows, k) for k, _ in cols)]
        print(f"| {label} | {len(rows)} | " + " | ".join(cells)
              + f" | {mean_std(rows, 'rank_N')[0]:.1f} | {mean_std(rows, 'signal_dims')[0]:.1f} | "
              f"{mean_std(rows, 'objective_knn_corr')[0]:+.2f} | "
              f"{mean_std(rows, 'alignment_first')[0]:.2f} → "
              f"{mean_std(rows, 'alignment_last')[0]:.2f} | {mean_std(rows, 'train_time_s')[0]:.0f} |")
    for label, ev in refs.items():
        print(f"| {label} (no training) | — | {100 * ev['linear_probe']:.1f} | {100 * ev['knn_k20']:.1f} | "
              f"{100 * ev['knn_k200']:.1f} | | | | | | | |")


def print_differences(groups, reference):
    if reference not in groups:
        return
    print(f"\n| paired difference (seeds) | " + " | ".join(f"{k} (pts, 95% interval)" for k in
                                                          ("linear_probe", *KNN_SETTINGS)) + " |")
    print("|---|---|---|---|")
    for label, rows in groups.items():
        if label != reference:
            cells = []
            for key in ("linear_probe", *KNN_SETTINGS):
                m, lo, hi = paired_difference(groups[reference], rows, key)
                cells.append(f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
            print(f"| {reference} − {label} ({len(rows)}) | " + " | ".join(cells) + " |")


def plot(histories, groups, split, out):
    """kNN by epoch per loss (seed means), the PEIRA objective against test kNN over the epochs of
    each PEIRA run (the talk's first CIFAR-10 figure), P–S alignment by epoch (its second)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for key, ylabel, name in (("knn", "kNN monitor, k 200 (%)", "knn_by_epoch"),
                              ("alignment", "alignment of P with S", "alignment_by_epoch")):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for i, (label, runs) in enumerate(histories.items()):
            values = np.mean([[h[key] for h in run] for run in runs], axis=0) * (100 if key == "knn" else 1)
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, color=f"C{i}", label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=split)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}_{split}.png"), dpi=120)
        plt.close(fig)
    peira_runs = next((runs for label, runs in histories.items() if label.startswith("peira")), None)
    if peira_runs:
        label = next(label for label in histories if label.startswith("peira"))
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for s, (run, row) in enumerate(zip(peira_runs, groups[label])):
            ax.plot([100 * h["knn"] for h in run], [h["objective"] for h in run], marker="o", ms=3,
                    label=f"seed {s}: corr {row['objective_knn_corr']:+.2f}")
        ax.set(xlabel="test kNN (%)", ylabel="PEIRA objective (running moments)", title=f"{label}, {split}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"objective_vs_knn_{split}.png"), dpi=120)
        plt.close(fig)


def plot_lam_sweep(rows, initial, out):
    """Linear probe, kNN, effective rank of N and the directions seen at the last epoch against λ
    (validation split), with the untrained network's lam_max: above it λ switches off more than half of
    the directions its views show (README, Choosing λ)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(LAM_SWEEP, [100 * r["linear_probe"] for r in rows], marker="o", label="linear probe (%)")
    ax.plot(LAM_SWEEP, [100 * r["knn_k20"] for r in rows], marker="s", label="kNN k20 (%)")
    ax.axvline(initial["lam_max"], color="grey", ls="--", lw=1,
               label=f"λ keeping half the untrained network's directions ({initial['lam_max']:.2f})")
    ax.set(xscale="log", xlabel="λ", ylabel="validation accuracy (%)")
    ax.set_xticks(LAM_SWEEP, [str(lam) for lam in LAM_SWEEP])
    ax.xaxis.set_minor_formatter(NullFormatter())
    twin = ax.twinx()
    twin.plot(LAM_SWEEP, [r["rank_N"] for r in rows], marker="^", color="C3")
    twin.plot(LAM_SWEEP, [r["signal_dims"] for r in rows], marker="v", color="C4")
    twin.set_ylabel("rank(N) (▲), directions seen (▼)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lam_sweep.png"), dpi=120)
    plt.close(fig)


def near_ties(loss, groups):
    """The trials of `loss` whose validation probe on seed 0 (the first of groups[label]) is within
    TIE_MARGIN of its best, bound included (the probes are float32 fractions); only the best when no
    other comes that close."""
    probe = [groups[trial_name(loss, t)][0]["linear_probe"] for t in TRIALS[loss]]
    return [t for t, p in zip(TRIALS[loss], probe) if p >= max(probe) - TIE_MARGIN - 1e-6]


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join("out", f"bench_{args.dataset}")
    setting = dict(SETTING[args.dataset])
    setting.update({k: getattr(args, k) for k in ("train_size", "epochs", "bf16")
                    if getattr(args, k) is not None})
    losses = [x for x in (args.losses or "peira,simsiam,vicreg").split(",") if x]
    try:
        seeds = [int(s) for s in (args.seeds or ("0" if args.trial else "0,1,2")).split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers (got {args.seeds!r})")
    if any(x not in TRIALS for x in losses) or setting["epochs"] < 2:
        parser.error(f"--losses from {', '.join(TRIALS)} (got {args.losses!r}); --epochs ≥ 2")
    if args.tune and args.seeds:
        parser.error("--seeds: --tune runs the trials with seed 0 (near ties also with seed 1)")
    if args.lam_sweep and (args.seeds or args.losses):
        parser.error("--lam-sweep runs PEIRA with seed 0")
    seeds = [0] if args.tune or args.lam_sweep else seeds
    if args.trial:
        if args.losses:
            parser.error("--losses: --trial names its loss in its JSON")
        try:
            trial_loss, trial = parse_trial(args.trial)
        except ValueError as e:
            parser.error(str(e))
    split = "validation" if args.tune or args.trial or args.lam_sweep else "test"
    os.makedirs(args.out, exist_ok=True)
    data = build_split(args, setting, split)
    tuned_path = os.path.join(args.out, "tuned.json")
    if args.tune:
        plan = [(loss, trial) for loss in losses for trial in TRIALS[loss]]
    elif args.lam_sweep:
        plan = [("peira", trial) for trial in lam_sweep_runs()]
    elif args.trial:
        plan = [(trial_loss, trial)]
    elif args.compare_augment:
        plan = [("peira", {"lam": 0.1, "augment": pipeline}) for pipeline in ("batched", "per-image")]
    else:
        tuned = {}
        if os.path.exists(tuned_path):
            with open(tuned_path) as fh:
                tuned = json.load(fh)
        missing = [loss for loss in losses if loss not in tuned.get("choice", {})]
        if missing or tuned.get("setting") != setting:
            raise SystemExit(f"{tuned_path} holds no choice for {', '.join(missing) or 'this setting'}: run "
                             f"with --tune first (settings are chosen on the validation split, never on the "
                             f"test images)")
        plan = [(loss, tuned["choice"][loss]) for loss in losses]
    t0 = time.time()

    # runs, then the offline evaluation of each (the split read once)
    splits = train_cifar.load_splits(data, 0)
    histories, groups = {}, {}

    def run(loss, trial, seed):
        label = trial_name(loss, trial)
        out = os.path.join(args.out, f"runs-{split}", f"{label}-seed{seed}")
        history = train_run(run_argv(data, out, loss, trial, seed, setting))
        histories.setdefault(label, []).append(history)
        evaluation = evaluate_run(out, splits, args.probe_epochs)
        groups.setdefault(label, []).append(summary(history, evaluation))

    for loss, trial in plan:
        for seed in seeds:
            run(loss, trial, seed)
    ties = {}
    if args.tune:  # near ties on seed 0: run again with TIE_SEED
        for loss in losses:
            ties[loss] = near_ties(loss, groups)
            if len(ties[loss]) > 1:
                for trial in ties[loss]:
                    run(loss, trial, TIE_SEED)
    refs = references(splits, setting, args.probe_epochs)
    initial = initial_views(splits, setting) if args.lam_sweep else None  # the λ figure's line

    # choice (validation), table, differences, figures
    print(f"\n{args.dataset}, {split} split, {setting}, seeds {seeds}, {time.time() - t0:.0f} s")
    print_table(groups, refs)
    if initial is not None:
        kept = ", ".join(f"λ {lam} keeps {n}" for lam, n in initial["kept_by_lam"].items())
        print(f"untrained network's views (seed 0): directions seen {initial['signal_dims']} above the null "
              f"level {initial['null_level']:.2f} ({kept}); λ below {initial['lam_max']:.2f} keeps at least "
              f"half of them")
    result = {"split": split, "setting": setting, "seeds": seeds, "references": refs,
              "initial_views": initial, "runs": groups}
    if args.tune:  # each loss's best trial, merged into tuned.json (kept only for the same setting)
        tuned = {"setting": setting, "choice": {}}
        if os.path.exists(tuned_path):
            with open(tuned_path) as fh:
                saved = json.load(fh)
            if saved.get("setting") == setting:
                tuned = saved
        for loss in losses:
            best = max(ties[loss], key=lambda t: mean_std(groups[trial_name(loss, t)], "linear_probe")[0])
            tuned["choice"][loss] = best
            rows = groups[trial_name(loss, best)]
            how = f"mean of seeds 0 and {TIE_SEED}, a near tie" if len(rows) > 1 else "seed 0"
            probe = mean_std(rows, "linear_probe")[0]
            print(f"{loss}: chosen {best} (validation linear probe {100 * probe:.1f}%, {how})")
        with open(tuned_path, "w") as fh:
            json.dump(tuned, fh, indent=1)
        result["tuned"] = tuned
        result["near_ties"] = {"seed": TIE_SEED, "trials": {k: t for k, t in ties.items() if len(t) > 1}}
    elif args.lam_sweep:
        plot_lam_sweep([groups[trial_name("peira", t)][0] for t in lam_sweep_runs()], initial, args.out)
    elif args.trial:
        return result  # its evaluation stays in its run's folder; results_validation.json is the trials'
    elif args.compare_augment:
        print_differences(groups, trial_name(*plan[0]))
    else:
        reference = trial_name("peira", tuned["choice"]["peira"]) if "peira" in losses else None
        print_differences(groups, reference)
        plot(histories, groups, split, args.out)
    name = "lam_sweep" if args.lam_sweep else split
    with open(os.path.join(args.out, f"results_{name}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
