"""The recorded GAN comparison (issue 20): minimax, non-saturating, hinge, least-squares and
WGAN-GP losses against a learned GAN loss (a weighted mixture of their terms, searched by CMA-ES
on the validation Fréchet distance), on the ring of 8 Gaussians; every loss at a learning rate
tuned with the same number of training runs the search uses.

    python scripts/gan_record.py                        # writes experiments/gan_ring/
    python scripts/gan_record.py --data mnist1d         # writes experiments/gan_mnist1d/
    python scripts/gan_record.py --quick --out /tmp/g   # a smoke run in seconds

Protocol: each fixed loss's lr (shared by both players' Adam) is tuned with Optuna's TPE (seed
0, log-uniform [1e-4, 1e-2], 2e-3 the first trial) on the mean validation Fréchet distance of
``--tune-seeds`` runs (seeds 20000+); the learned loss starts at the non-saturating loss, is
searched at that loss's tuned lr (seeds 50000+, common random numbers), then its own lr is tuned
the same way. Test: ``--test-seeds`` seeds 0.. for every loss (seed i: the same initial players,
data and noise for every loss); metric test/frechet (lower is better), the reference baseline
chosen on val/frechet, paired t-tests Holm-adjusted (metaloss.metatest.significance); modes
covered and the high-quality fraction reported beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("frechet", "modes", "high_quality")
TITLES = {"ring": "GAN, ring of 8 Gaussians", "mnist1d": "GAN, MNIST-1D"}


def _budgets() -> dict:
    from metaloss.gan.train import Budget

    # the task configs' budgets (conf/task/gan_ring.yaml, gan_mnist1d.yaml)
    return {
        "ring": Budget(),
        "mnist1d": Budget(steps=1000, hidden=128, samples=1000, data="mnist1d"),
    }


def tune_lr(loss, budget, runs: int, seeds: int, default: float, label: str) -> dict:
    import optuna

    from metaloss.gan.train import TUNE_SEEDS, mean_measure

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = max(1, runs // seeds)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial({"lr": default})
    tune_seeds = [TUNE_SEEDS + j for j in range(seeds)]

    def objective(trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        v = mean_measure(loss, budget, lr, tune_seeds, "val_frechet")
        return v if math.isfinite(v) else 1e6  # a diverged lr ranks below every finished one

    study.optimize(objective, n_trials=trials)
    best = study.best_trial
    print(f"{label}: lr {best.params['lr']:.4g} (val Fréchet {best.value:.4g}, {trials} trials)")
    return {
        "lr": float(best.params["lr"]),
        "val_frechet": float(best.value),
        "trials": trials,
        "runs": trials * seeds,
        "default_lr": default,
    }


def table(record: dict) -> list[str]:
    """results.md: every loss's tuned lr and test measures, then the paired comparison."""
    head = {
        "ring": "| loss | lr (tuned) | test Fréchet distance | modes covered (of 8) "
        "| high-quality |",
        "mnist1d": "| loss | lr (tuned) | test Fréchet distance (classifier features) | classes "
        "covered (of 10) | precision |",
    }[record["budget"].get("data", "ring")]
    lines = [head, "|---|---|---|---|---|"]
    for name, res in record["results"].items():
        cells = [
            f"{np.mean(res['test/' + k]):.4g} ± {np.std(res['test/' + k], ddof=1):.2g}"
            for k in KEYS
        ]
        lines.append(f"| {name} | {record['tuning'][name]['lr']:.3g} | " + " | ".join(cells) + " |")
    sig = record["significance"]
    lines += [
        "",
        f"learned vs the reference ({sig['best_baseline']}, chosen on val/frechet): "
        f"difference {sig['difference']:+.4g} [95% CI {sig['ci_low']:+.4g}, "
        f"{sig['ci_high']:+.4g}], Holm p = {sig['p_value_holm']:.3g} -> {sig['verdict']} "
        f"({sig['n_seeds']} seeds; lower is better)",
    ]
    return lines


def samples_figure(out: Path) -> None:
    """samples.png / .pdf: the generated points of every loss on test seed 0 (retrained at the
    lr results.json records; the learned loss from learned_gan_loss.pt) over the ring's modes;
    on MNIST-1D, eight generated signals of each loss beside eight real ones."""
    import torch

    from metaloss.figures import save, style
    from metaloss.gan.losses import FIXED, LearnedGANLoss
    from metaloss.gan.train import Budget, ring_means, train_gan

    record = json.loads((out / "results.json").read_text())
    budget = Budget(**record["budget"])
    learned = LearnedGANLoss()
    learned.load_state_dict(
        torch.load(out / "learned_gan_loss.pt", weights_only=True)["state_dict"]
    )
    losses = {"learned": learned, **FIXED}
    if budget.data != "ring":
        _signals_figure(out, budget, losses, record)
        return
    means = ring_means()
    with style() as plt:
        fig, axes = plt.subplots(1, len(losses), figsize=(2.2 * len(losses), 2.5), squeeze=False)
        for ax, (name, loss) in zip(axes.flat, losses.items()):
            pts: list = []
            m = train_gan(loss, budget, lr=record["tuning"][name]["lr"], seed=0, points=pts)
            xy = pts[0][:1000]
            ax.scatter(
                xy[:, 0], xy[:, 1], s=2, alpha=0.5, lw=0, color="C3" if name == "learned" else "C0"
            )
            ax.scatter(means[:, 0], means[:, 1], s=18, marker="x", color="k", lw=1)
            ax.set_title(f"{name}\n{m['modes']:.0f} modes, FD {m['frechet']:.3f}", fontsize=8)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
        fig.tight_layout()
        for path in save(fig, out / "samples.png"):
            print(path)


def _signals_figure(out: Path, budget, losses: dict, record: dict) -> None:
    import torch

    from metaloss.figures import save, style
    from metaloss.gan.train import real_data, train_gan

    g = torch.Generator().manual_seed(0)
    panels = {"real (test)": (real_data(budget.data).reference(8, g, "test"), "")}
    for name, loss in losses.items():
        pts: list = []
        m = train_gan(loss, budget, lr=record["tuning"][name]["lr"], seed=0, points=pts)
        panels[name] = (pts[0][:8], f"\n{m['modes']:.0f} classes, FD {m['frechet']:.1f}")
    with style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 3.2), squeeze=False)
        for ax, (name, (signals, note)) in zip(axes.flat, panels.items()):
            color = "C3" if name == "learned" else "k" if name.startswith("real") else "C0"
            for i, sig in enumerate(signals):
                ax.plot(sig.numpy() - 4.0 * i, color=color, lw=0.8)
            ax.set_title(name + note, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        for path in save(fig, out / "samples.png"):
            print(path)


def main() -> None:
    import torch

    from metaloss.figures import comparison_figure
    from metaloss.gan.losses import FIXED, LearnedGANLoss
    from metaloss.gan.train import Budget, search, train_gan
    from metaloss.metatest import significance

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["ring", "mnist1d"], default="ring")
    ap.add_argument("--out", type=Path, default=None, help="default: experiments/gan_<data>")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--tune-seeds", type=int, default=2)
    ap.add_argument("--test-seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (not a record)")
    ap.add_argument(
        "--figure",
        action="store_true",
        help="only draw samples.png: each loss retrained on test seed 0 at its recorded lr",
    )
    ap.add_argument(
        "--readme",
        action="store_true",
        help="only rewrite the record's generated table from --out's results.json (no training): "
        "README.md's gan block (ring), docs/results.md's gan_<data> block (others)",
    )
    args = ap.parse_args()
    if args.out is None:
        args.out = ROOT / "experiments" / f"gan_{args.data}"
    if args.figure:
        samples_figure(args.out)
        return
    if args.readme:
        from readme_block import replace_block  # scripts/ (this script's directory)

        record = json.loads((args.out / "results.json").read_text())
        if record.get("quick"):
            raise SystemExit("gan_record --readme: a --quick run is not a record")
        if record["budget"].get("data", "ring") == "ring":
            replace_block("gan", table(record), "gan_record --readme")
        else:  # the README keeps one GAN table; the others are in docs/results.md
            block, results = f"gan_{record['budget']['data']}", ROOT / "docs" / "results.md"
            replace_block(block, table(record), "gan_record --readme", readme=results)
        return
    torch.set_num_threads(1)
    budget = _budgets()[args.data]
    if args.quick:
        budget = Budget(steps=5, batch=16, hidden=8, samples=64, data=args.data)
        args.generations, args.popsize, args.tune_seeds, args.test_seeds = 1, 2, 1, 2
    runs = args.generations * args.popsize  # one seed per candidate
    t0 = time.perf_counter()
    tuning = {n: tune_lr(loss, budget, runs, args.tune_seeds, 2e-3, n) for n, loss in FIXED.items()}
    learned = LearnedGANLoss()
    history: list[dict] = []
    t1 = time.perf_counter()
    search(
        learned,
        budget,
        lr=tuning["non_saturating"]["lr"],
        generations=args.generations,
        popsize=args.popsize,
        sigma0=0.3,
        progress=lambda r: (history.append(r), print(r)),
    )
    t_search = time.perf_counter() - t1
    tuning["learned"] = tune_lr(
        learned, budget, runs, args.tune_seeds, tuning["non_saturating"]["lr"], "learned"
    )
    results: dict[str, dict[str, list[float]]] = {}
    for name, loss in {"learned": learned, **FIXED}.items():
        runs_ = [
            train_gan(loss, budget, lr=tuning[name]["lr"], seed=s) for s in range(args.test_seeds)
        ]
        results[name] = {
            f"{split}/{k}": [r[pre + k] for r in runs_]
            for split, pre in (("test", ""), ("val", "val_"))
            for k in KEYS
        }
    sig = significance(results, "test/frechet")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": learned.state_dict()}, args.out / "learned_gan_loss.pt")
    record = {
        "budget": budget.__dict__,
        "quick": bool(args.quick),
        "search": {
            "generations": args.generations,
            "popsize": args.popsize,
            "training_runs": runs,
            "seconds": round(t_search, 1),
            "history": history,
            "weights": {k: v.tolist() for k, v in learned.state_dict().items()},
        },
        "tuning": tuning,
        "seconds_total": round(time.perf_counter() - t0, 1),
        "results": results,
        "significance": sig,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    comparison_figure(
        {k: {m: v for m, v in r.items() if m.startswith("test/")} for k, r in results.items()},
        args.out / "comparison.png",
        significance=sig,
        title=TITLES[budget.data],
    )
    lines = table(record)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
