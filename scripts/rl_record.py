"""The recorded policy-gradient comparison (issue 20): REINFORCE with a baseline against a
learned policy loss (ML3's manner, searched by CMA-ES on the return of the policies it
trains), on Gymnasium's CartPole, each at a learning rate tuned with the same budget.

    python scripts/rl_record.py                       # writes experiments/rl_cartpole/
    python scripts/rl_record.py --quick --out /tmp/x  # a smoke run in seconds

Protocol (docs/protocol.md's rules, in this family's terms):
1. REINFORCE's lr is tuned with Optuna's TPE (seed 0, log-uniform [1e-3, 1], its default 0.01
   the first trial) on the mean final return of ``--tune-seeds`` runs (seeds 20000+, never a
   test seed), with as many training runs as the search uses.
2. The learned loss starts at REINFORCE exactly (its residual network's output layer is zero)
   and CMA-ES moves it: each generation's candidates train policies from the same new seeds
   (50000+: common random numbers), fitness = mean final return; at REINFORCE's tuned lr.
3. The learned loss's own lr is then tuned exactly as REINFORCE's was (same budget, seeds).
4. Meta-test: ``--test-seeds`` seeds 0.. for both losses (seed i: the same initial policy and
   the same environment resets for both), final return over 32 evaluation episodes (seeds
   1000000+); paired t-test (metaloss.metatest.significance).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def tune_lr(loss, budget, runs: int, seeds: int, default: float, label: str) -> dict:
    import optuna

    from metaloss.rl.train import TUNE_SEEDS, mean_return

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = max(1, runs // seeds)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial({"lr": default})
    tune_seeds = [TUNE_SEEDS + j for j in range(seeds)]

    def objective(trial) -> float:
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        r = mean_return(loss, budget, lr, tune_seeds)
        return r if math.isfinite(r) else -1.0  # a diverged lr ranks below every finished one

    study.optimize(objective, n_trials=trials)
    best = study.best_trial
    print(f"{label}: lr {best.params['lr']:.4g} (val return {best.value:.1f}, {trials} trials)")
    return {
        "lr": float(best.params["lr"]),
        "val_return": float(best.value),
        "trials": trials,
        "runs": trials * seeds,
        "default_lr": default,
        "default_val_return": float(study.trials[0].value),
    }


def table(record: dict, seeds: int) -> list[str]:
    """results.md: each loss's tuned lr and test return, then the paired comparison."""
    lines = ["| loss | lr (tuned) | test return, mean ± sd over seeds |", "|---|---|---|"]
    tuning = record["tuning"]
    for name, label, lr in (
        ("learned", "learned", tuning["learned"]["lr"]),
        ("reinforce", "reinforce", tuning["reinforce"]["lr"]),
        ("learned_at_reinforce_lr", "learned at REINFORCE's lr", tuning["reinforce"]["lr"]),
    ):
        v = record["results"][name]["test/return"]
        lines.append(f"| {label} | {lr:.4g} | {np.mean(v):.1f} ± {np.std(v, ddof=1):.1f} |")
    sig = record["significance"]
    pw = sig["pairwise"]["reinforce"]
    runs = record["search"]["training_runs"]
    lines += [
        "",
        f"Compute in training runs: REINFORCE's lr tuning {tuning['reinforce']['runs']}; the "
        f"learned loss's search {runs} + its lr tuning {tuning['learned']['runs']}.",
        f"learned vs reinforce: difference {pw['difference']:+.1f} "
        f"[95% CI {sig['ci_low']:+.1f}, {sig['ci_high']:+.1f}], paired t p = {pw['p_value']:.3g} "
        f"-> {sig['verdict']} ({seeds} seeds)",
    ]
    return lines


def write_readme(record: dict) -> None:
    """Put :func:`table` of ``record`` between README.md's ``<!-- rl:start -->`` and
    ``<!-- rl:end -->`` markers (refused for a --quick record or a README without them)."""
    from readme_block import replace_block  # scripts/ (this script's directory)

    if record.get("quick"):
        raise SystemExit("rl_record --readme: a --quick run is not a record")
    seeds = len(record["results"]["learned"]["test/return"])
    replace_block("rl", table(record, seeds), "rl_record --readme")


def main() -> None:
    import torch

    from metaloss.figures import comparison_figure, save, style
    from metaloss.metatest import significance
    from metaloss.rl.losses import LearnedPolicyLoss, reinforce
    from metaloss.rl.train import Budget, search, train_policy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "rl_cartpole")
    ap.add_argument("--generations", type=int, default=15)
    ap.add_argument("--popsize", type=int, default=12)
    ap.add_argument("--search-seeds", type=int, default=2)
    ap.add_argument("--tune-seeds", type=int, default=5)
    ap.add_argument("--test-seeds", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (not a record)")
    ap.add_argument(
        "--readme",
        action="store_true",
        help="only rewrite README.md's rl block from --out's results.json (no training)",
    )
    args = ap.parse_args()
    if args.readme:
        write_readme(json.loads((args.out / "results.json").read_text()))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    budget = Budget(updates=10, episodes=8, max_steps=500, eval_episodes=32)
    if args.quick:
        budget = Budget(updates=2, episodes=2, max_steps=50, eval_episodes=2)
        args.generations, args.popsize, args.tune_seeds, args.test_seeds = 2, 3, 2, 2
    for key in ("generations", "popsize", "search_seeds", "tune_seeds", "test_seeds"):
        if getattr(args, key) < (2 if key in ("popsize", "test_seeds") else 1):
            raise SystemExit(f"rl_record: --{key.replace('_', '-')} is too small")
    runs = args.generations * args.popsize * args.search_seeds  # the search's training runs
    t0 = time.perf_counter()
    tuned_reinforce = tune_lr(reinforce, budget, runs, args.tune_seeds, 0.01, "reinforce")
    t_tune = time.perf_counter() - t0

    learned = LearnedPolicyLoss(hidden=8)
    history: list[dict] = []

    def show(row: dict) -> None:
        history.append(row)
        print(
            f"generation {row['generation']}: best {row['best_return']:.1f}, "
            f"mean {row['mean_return']:.1f}, sigma {row['sigma']:.3g}"
        )

    t1 = time.perf_counter()
    search(
        learned,
        budget,
        lr=tuned_reinforce["lr"],
        generations=args.generations,
        seeds=args.search_seeds,
        sigma0=0.5,
        popsize=args.popsize,
        seed=0,
        progress=show,
    )
    t_search = time.perf_counter() - t1
    tuned_learned = tune_lr(
        learned, budget, runs, args.tune_seeds, tuned_reinforce["lr"], "learned"
    )

    results: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, list[list[float]]] = {}
    for name, loss, lr in (
        ("learned", learned, tuned_learned["lr"]),
        ("reinforce", reinforce, tuned_reinforce["lr"]),
        ("learned_at_reinforce_lr", learned, tuned_reinforce["lr"]),
    ):
        runs_ = [train_policy(loss, budget, lr=lr, seed=s) for s in range(args.test_seeds)]
        results[name] = {
            "test/return": [float(r["return"]) for r in runs_],  # type: ignore[arg-type]
            "val/return": [float(r["val_return"]) for r in runs_],  # type: ignore[arg-type]
        }
        curves[name] = [list(r["curve"]) for r in runs_]  # type: ignore[call-overload]
    main_results = {k: results[k] for k in ("learned", "reinforce")}
    sig = significance(main_results, "test/return")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": learned.state_dict(), "hidden": 8}, args.out / "learned_policy_loss.pt"
    )
    record = {
        "budget": budget.__dict__,
        "search": {
            "generations": args.generations,
            "popsize": args.popsize,
            "seeds_per_candidate": args.search_seeds,
            "training_runs": runs,
            "env_steps_at_most": runs * budget.steps_per_run,
            "seconds": round(t_search, 1),
            "history": history,
        },
        "tuning": {
            "reinforce": tuned_reinforce,
            "learned": tuned_learned,
            "seconds_reinforce": round(t_tune, 1),
        },
        "results": results,
        "significance": sig,
        "curves": curves,
        "quick": bool(args.quick),
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    comparison_figure(main_results, args.out / "comparison.png", significance=sig, title="CartPole")
    with style() as plt:
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        for name, color in (("learned", "C3"), ("reinforce", "C0")):
            # a diverged run stopped early: its missing updates are NaN, left out of the mean
            c = np.full((len(curves[name]), budget.updates), np.nan)
            for i, row in enumerate(curves[name]):
                c[i, : len(row)] = row
            m = np.nanmean(c, 0)
            s = np.nanstd(c, 0, ddof=1) / np.sqrt(np.isfinite(c).sum(0).clip(min=1))
            x = np.arange(1, c.shape[1] + 1)
            ax.plot(x, m, color=color, label=f"{name} (lr {record['tuning'][name]['lr']:.3g})")
            ax.fill_between(x, m - 1.96 * s, m + 1.96 * s, color=color, alpha=0.2, lw=0)
        ax.set_xlabel("policy update")
        ax.set_ylabel("mean return of the update's episodes")
        ax.legend(frameon=False)
        fig.tight_layout()
        save(fig, args.out / "learning_curves.png")
    lines = table(record, args.test_seeds)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
