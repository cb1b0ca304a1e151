"""`metaloss-fewshot`: MAML over few-shot episodes with an inner loss, then the meta-test.

    metaloss-fewshot                                   # MAML (cross-entropy), 5-way 1-shot
    metaloss-fewshot fewshot_loss=metal episodes.shot=5
    metaloss-fewshot -m fewshot_loss=ce,ml3,metal,metal_noquery

The run directory gets ``result.json`` (the meta-test's mean, its 95% CI, every episode's score,
the meta-training history) and ``meta.pt`` (the best meta-parameters on meta-validation: θ0 and
φ, plain tensors). docs/fewshot.md describes the benchmark and the protocol.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.conf import HydraConf
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from metaloss.cli.app import hydra_command, output_dir, run_command
from metaloss.cli.logger import open_logger
from metaloss.config import load_option
from metaloss.errors import ConfigError
from metaloss.fewshot.losses import InnerLoss
from metaloss.fewshot.maml import FewShotProblem, hidden_layers, initial_meta
from metaloss.fewshot.train import meta_test, meta_train
from metaloss.losses.base import loss_kinds
from metaloss.runs import RunDir, atomic_write, atomic_write_text, hydra_record

log = logging.getLogger("metaloss")


def build_inner_loss(cfg: DictConfig, episodes: Any, model: torch.nn.Module) -> InnerLoss:
    """The ``fewshot_loss`` node with what the run knows filled in: a per-example loss named
    by ``loss`` (an option of conf/loss, by name, with ``loss_params`` over it), or MeTAL's
    sizes (the episodes' outputs, the model's hidden layers, ``maml.steps``)."""
    node = cfg.fewshot_loss
    target = str(node.get("_target_", ""))
    kind = episodes.kind
    if target.endswith(".PerExample"):
        name = node.get("loss")
        if not isinstance(name, str):
            raise ConfigError(f"fewshot_loss.loss = {name!r}: must name a loss option (conf/loss)")
        option = OmegaConf.merge(load_option("loss", name), node.get("loss_params") or {})
        assert isinstance(option, DictConfig)  # a loss option merged with a mapping
        fit_to = option.get("fit_to")
        wanted = "ce" if kind == "classification" else "mse"
        if fit_to not in (None, wanted):
            raise ConfigError(
                f"fewshot_loss.loss_params.fit_to = {fit_to!r}: {kind} episodes start a learned "
                f"loss at {wanted!r} (fewshot_loss=ml3 for classification, ml3_mse for regression)"
            )
        try:
            built = instantiate(option)
        except Exception as err:  # a setting the loss does not take, or a value it refuses
            raise ConfigError(f"fewshot_loss.loss = {name!r} with {dict(option)}: {err}") from err
        if kind not in loss_kinds(built):
            raise ConfigError(
                f"fewshot_loss.loss = {name!r} is a loss for {', '.join(loss_kinds(built))} "
                f"tasks; the episodes ({episodes.name}) are {kind}"
            )
        _try_on_an_episode(built, name, episodes)
        rest = OmegaConf.masked_copy(node, [k for k in node if k not in ("loss", "loss_params")])
        made = instantiate(rest, loss=built, kind=kind)
        return made() if isinstance(made, functools.partial) else made
    made = instantiate(
        node,
        out_dim=episodes.out_dim,
        layers=hidden_layers(model),
        steps=int(cfg.maml.steps),
        kind=kind,
    )
    return made() if isinstance(made, functools.partial) else made


def _try_on_an_episode(loss: Any, name: str, episodes: Any) -> None:
    """Run the loss once on an episode's support set with chance outputs, before any training:
    a loss that needs what a few-shot episode does not have (class counts, inputs) is refused
    here, naming the setting, not deep in the first meta-step."""
    batch = episodes.sample("train", 1, 0)
    y = batch.y_support[0]
    out = torch.zeros(len(y), episodes.out_dim)
    try:
        value = loss(out, y)
        ok = isinstance(value, torch.Tensor) and value.shape == (len(y),)
    except Exception as err:
        raise ConfigError(
            f"fewshot_loss.loss = {name!r} cannot score an episode's support set ({err}); "
            "use a loss that needs only (prediction, target)"
        ) from err
    if not ok:
        raise ConfigError(f"fewshot_loss.loss = {name!r}: must return one value per example")


def run(cfg: DictConfig, out_dir: Path, label: str | None = None) -> dict:
    """Steps 2–6 of the application skeleton (:mod:`metaloss.cli.app`) for one run; ``label``
    names the inner loss in the results (default: the option's loss or class name)."""
    return run_command(cfg, out_dir, "fewshot", functools.partial(_work, label=label))


def _work(
    cfg: DictConfig,
    run_dir: RunDir,
    device: torch.device,
    dtype: torch.dtype,
    label: str | None = None,
) -> dict:
    out = run_dir.path
    episodes = instantiate(cfg.episodes)
    torch.manual_seed(int(cfg.seed))
    model = instantiate(cfg.model)(in_shape=episodes.in_shape, out_dim=episodes.out_dim)
    loss = build_inner_loss(cfg, episodes, model)
    model, loss = model.to(device, dtype), loss.to(device, dtype)
    problem = FewShotProblem(
        model,
        loss,
        episodes.kind,
        steps=int(cfg.maml.steps),
        inner_lr=float(cfg.maml.inner_lr),
        first_order=bool(cfg.maml.first_order),
    )
    run_dir.record(hydra_record(cfg))
    label = label or _label(cfg)
    source = _OnDevice(episodes, device, dtype)
    with open_logger(cfg, out, job_type="fewshot", name=f"fewshot-{label}") as logger:
        result = _meta_train(cfg, problem, source, initial_meta(model, loss), label, logger, out)
        test = meta_test(
            problem,
            result.meta,
            source,
            n=int(cfg.fewshot.test_episodes),
            seed=int(cfg.fewshot.eval_seed),
        )
        summary = _summary(cfg, label, episodes, result, test)
        metric = summary["metric"]
        _save_meta(out / "meta.pt", result.meta)
        atomic_write_text(out / "result.json", json.dumps(summary, indent=1))
        logger.summary({metric: test["mean"], f"{metric}_ci95": test["ci95"]})
    pct = 100 if episodes.kind == "classification" else 1
    print(
        f"{label}: {metric} {pct * test['mean']:.2f} ± {pct * test['ci95']:.2f} (95% CI, "
        f"{test['episodes']} meta-test episodes); best meta-val at step {result.best_step}\n"
        f"results: {out / 'result.json'}"
    )
    return summary


def _meta_train(cfg, problem, source, meta, label: str, logger, out: Path):
    """Meta-training with a progress bar and the logger; interrupted, the best meta-parameters
    so far are saved to meta_interrupted.pt (never called a result) before the signal goes on."""
    fs = cfg.fewshot
    steps = int(fs.meta_steps)
    bar = tqdm(total=steps, desc=f"meta-train {label}", disable=not cfg.progress, mininterval=1.0)
    try:
        return meta_train(
            problem,
            source,
            meta,
            steps=steps,
            meta_batch=int(fs.meta_batch),
            lr=float(fs.lr),
            seed=int(cfg.seed),
            val_every=int(fs.val_every),
            val_episodes=int(fs.val_episodes),
            eval_seed=int(fs.eval_seed),
            clip_grad_norm=None if fs.clip_grad_norm is None else float(fs.clip_grad_norm),
            log=lambda metrics, step: logger.log(metrics, step=step),
            progress=lambda i: bar.update(1),
            compile=bool(fs.compile),
        )
    except KeyboardInterrupt as stop:
        partial = getattr(stop, "result", None)
        if partial is not None:
            _save_meta(out / "meta_interrupted.pt", partial.meta)
            log.warning(
                "interrupted at meta-step %d: the best meta-parameters so far (meta-val "
                "%.4f at step %d) are in %s; no meta-test was run",
                len(partial.train),
                partial.best_val,
                partial.best_step,
                out / "meta_interrupted.pt",
            )
        raise
    finally:
        bar.close()


def _summary(cfg: DictConfig, label: str, episodes: Any, result: Any, test: dict) -> dict:
    """result.json: the meta-test, the meta-training history and the run's settings."""
    return {
        "loss": label,
        "episodes": {"name": episodes.name, **_plain(cfg.episodes)},
        "metric": "test/acc" if episodes.kind == "classification" else "test/mse",
        "mean": test["mean"],
        "ci95": test["ci95"],
        "test_episodes": test["episodes"],
        "best_step": result.best_step,
        "best_val": result.best_val,
        "per_episode": test["per_episode"],
        "val_history": result.val,
        "train_history": result.train,
        "seed": int(cfg.seed),
        "episodes_info": getattr(episodes, "info", {}),
        "config": {
            k: _plain(cfg[k]) for k in ("episodes", "model", "fewshot_loss", "maml", "fewshot")
        },
    }


def _save_meta(path: Path, meta: dict[str, torch.Tensor]) -> None:
    best = {k: v.detach().cpu() for k, v in meta.items()}
    atomic_write(path, lambda tmp: torch.save(best, tmp))


def _plain(node: Any) -> dict:
    out = OmegaConf.to_container(node, resolve=True)
    assert isinstance(out, dict)  # a config group's node is a mapping
    return out


def _label(cfg: DictConfig) -> str:
    target = str(cfg.fewshot_loss.get("_target_", "loss")).rsplit(".", 1)[-1]
    return str(cfg.fewshot_loss.get("loss", target))


class _OnDevice:
    """Episodes sampled on the CPU (one stream everywhere), moved to the run's device."""

    def __init__(self, episodes: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.episodes, self.device, self.dtype = episodes, device, dtype
        self.kind = episodes.kind

    def sample(self, split: str, n: int, seed: int):
        return self.episodes.sample(split, n, seed).to(self.device, self.dtype)


def run_label(choice: str | None, overrides: list[str]) -> str | None:
    """The inner loss's name in results: the ``fewshot_loss`` option chosen, with the command
    line's own ``fewshot_loss.*`` settings (``ce[loss=focal]``, ``metal[residual=false]``), so
    two different losses never share a label."""
    if choice is None:
        return None
    own = sorted(
        o.lstrip("+~").split(".", 1)[1]
        for o in overrides
        if o.lstrip("+~").startswith("fewshot_loss.")
    )
    return f"{choice}[{','.join(own)}]" if own else choice


def _app(cfg: DictConfig, hc: HydraConf) -> float | None:
    label = run_label(hc.runtime.choices.get("fewshot_loss"), list(hc.overrides.task))
    return float(run(cfg, output_dir(hc), label)["mean"])


main = hydra_command("fewshot", _app)

if __name__ == "__main__":
    main()
