"""The embedding projection of a recorded metric-learning experiment: each loss trains one model
(the meta-test's set-up: the record's task, model, optimizer, steps and batch size; each loss at
the lr and hyper-parameters its meta-test used, read from comparison.json) on the draw of
meta-test seed 0, and the held-out test classes' embeddings are drawn in 2-D (PCA of the
unit-normalised embeddings, the first eight test classes coloured), one panel per loss with its
Recall@1. Nothing recorded is changed; writes experiments/<name>/embeddings.png and .pdf.

    python scripts/embedding_figure.py metric_mnist1d
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from metaloss.config import load_option
    from metaloss.figures import save, style
    from metaloss.losses.io import load_learned_loss
    from metaloss.tasks.base import meta_test_draws
    from metaloss.train import predict, train_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="experiments/<name> with meta_seed_0/ (an embedding task)")
    args = ap.parse_args()
    exp = ROOT / "experiments" / args.name
    run = exp / "meta_seed_0"
    if not (run / "comparison.json").is_file() or not (run / "learned_loss.pt").is_file():
        raise SystemExit(f"embedding_figure: {run} holds no recorded meta-test")
    rec = json.loads((run / "comparison.json").read_text())
    learned = load_learned_loss(run / "learned_loss.pt")
    setup = learned.meta["setup"]
    task_cfg = OmegaConf.merge(
        load_option("task", setup["task"]["option"]), setup["task"]["config"]
    )
    if rec.get("protocol", {}).get("fresh_draws"):
        task_cfg.seed = meta_test_draws(1, 1)[0]  # the draw of meta-test seed 0
    task = instantiate(task_cfg)
    if task.kind != "embedding":
        raise SystemExit(f"embedding_figure: {args.name} is a {task.kind} task, not embedding")
    model_cfg = OmegaConf.merge(
        load_option("model", setup["model"]["option"]), setup["model"]["config"]
    )
    optim_name = setup["optim"]["option"]
    # the experiment file's own meta-test settings (it is an override file: not composed alone)
    exp_cfg = OmegaConf.load(ROOT / "conf" / "experiment" / f"{args.name}.yaml")
    steps, batch = int(exp_cfg.meta_test.steps), exp_cfg.meta_test.batch_size
    panels = []
    for name, hp in rec["hyperparameters"].items():
        if name == "learned":
            loss = learned
        else:
            loss = instantiate(OmegaConf.merge(load_option("loss", name), hp.get("params") or {}))
        torch.manual_seed(0)
        model = instantiate(model_cfg)(in_shape=task.in_shape, out_dim=task.out_dim)
        lr = float(hp["lr"])
        opt = getattr(torch.optim, {"adam": "Adam", "sgd": "SGD"}[optim_name])
        result = train_model(
            task,
            model,
            loss,
            lambda p, opt=opt, lr=lr: opt(p, lr=lr),
            steps=steps,
            batch_size=batch,
            seed=0,
            progress=False,
        )
        with torch.no_grad():
            e = torch.nn.functional.normalize(predict(model, task.x_test), dim=-1)
        panels.append((name, e, result["test/recall_at_1"]))
        print(f"{name}: test/recall_at_1 {result['test/recall_at_1']:.4f}")
    y = task.y_test
    shown = y.unique()[:8]
    with style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 2.9), squeeze=False)
        for ax, (name, e, r1) in zip(axes.flat, panels):
            centred = e - e.mean(0)
            _, _, v = torch.pca_lowrank(centred, q=2, center=False)
            xy = centred @ v[:, :2]
            for i, c in enumerate(shown.tolist()):
                m = y == c
                ax.scatter(xy[m, 0], xy[m, 1], s=5, color=plt.cm.tab10(i), alpha=0.8, lw=0)
            ax.set_title(f"{name}\nRecall@1 {r1:.3f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{args.name}: held-out test classes (8 of {len(y.unique())}), PCA", y=1.02)
        fig.tight_layout()
        for p in save(fig, exp / "embeddings.png"):
            print(p.relative_to(ROOT))


if __name__ == "__main__":
    main()
