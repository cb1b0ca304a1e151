"""The meta-test as the entry points run it: learned loss vs the `compare:` baselines,
printed, saved as comparison.json / comparison.md / comparison.png, logged to W&B."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from metaloss.cli.logger import write_json
from metaloss.config import baselines_for
from metaloss.metatest import compare_losses, significance
from metaloss.plots import plot_losses
from metaloss.report import format_table, plot, summarize

log = logging.getLogger("metaloss")
TEST_TASK_SEEDS = 10_000  # task families: test tasks never overlap training tasks


def tasks_for_seed_fn(cfg: DictConfig, pool: list):
    """Meta-test tasks for a seed: fresh draws for a task family, else the task itself."""
    if not pool[0].distribution:
        return lambda seed: pool[:1]
    per = int(cfg.meta_test.tasks_per_seed)
    overrides = dict(cfg.meta_test.get("task_overrides") or {})  # e.g. a wider test distribution
    return lambda seed: [instantiate(cfg.task, **overrides, seed=TEST_TASK_SEEDS + seed * per + i)
                         for i in range(per)]


def run_meta_test(cfg: DictConfig, learned, pool: list, inner_opt, out_dir: Path, logger) -> dict:
    task = pool[0]
    baselines = baselines_for(cfg.compare, task)
    losses = {"learned": learned, **baselines}
    lr = cfg.meta_test.lr if cfg.meta_test.lr is not None else inner_opt.hparams["lr"]
    hp = {**inner_opt.hparams, "lr": lr}
    make_optimizer = functools.partial(inner_opt.torch_equivalent.func, **hp)
    seeds = list(range(int(cfg.meta_test.seeds)))
    log.info("meta-test: %s on %d seeds, %d steps of %s(lr=%g)", ", ".join(losses), len(seeds),
             cfg.meta_test.steps, inner_opt.name, lr)
    results = compare_losses(tasks_for_seed_fn(cfg, pool), instantiate(cfg.model), losses, make_optimizer,
                             seeds=seeds, steps=int(cfg.meta_test.steps),
                             batch_size=cfg.meta_test.batch_size, progress=cfg.progress)
    metric = cfg.meta_test.metric or task.primary_metric
    sig = significance(results, metric, alpha=float(cfg.meta_test.alpha))
    summary = summarize(results)
    table = format_table(summary)
    verdict = (f"learned vs best baseline ({sig['best_baseline']}) on {metric}: "
               f"{sig['learned_mean']:.4f} vs {sig['best_baseline_mean']:.4f}, "
               f"Welch p = {sig['p_value']:.3g} -> {sig['verdict']}") if sig else ""
    print(f"\n{table}\n\n{verdict}\n", flush=True)
    write_json(out_dir / "comparison.json", {"task": task.name, "metric": metric, "seeds": seeds,
                                             "results": results, "significance": sig})
    (out_dir / "comparison.md").write_text(f"{table}\n\n{verdict}\n")
    plot(summary, out_dir / "comparison.png")
    plot_losses(losses, task.kind, out_dir / "learned_vs_baselines.png", num_classes=task.num_classes,
                title=f"learned loss vs baselines ({task.name})")
    logger.image("meta_test/comparison", out_dir / "comparison.png")
    rows = [[name, k, s["mean"], s["std"], s["n"]] for name, m in summary.items() for k, s in m.items()]
    logger.table("meta_test/table", ["loss", "metric", "mean", "std", "n"], rows)
    logger.summary({f"meta_test/{name}/{k}": s["mean"] for name, m in summary.items() for k, s in m.items()})
    if sig:
        logger.summary({"meta_test/p_value": sig["p_value"], "meta_test/verdict": sig["verdict"]})
    return {"results": results, "significance": sig}
