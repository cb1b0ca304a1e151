"""CMA-ES as the outer optimizer: derivative-free meta-training of a small φ on a TRUE metric.

TaylorGLO (Gonzalez & Miikkulainen, "Optimizing Loss Functions through Multivariate Taylor
Polynomial Parameterization", GECCO 2021) evolves its 8 parameters with CMA-ES (Hansen &
Ostermeier 2001; Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) on
validation accuracy after a short training run. This is that outer loop, with the ``cma``
package's ask/tell interface::

    metaloss-meta task=digits loss=taylorglo meta_optim=cmaes meta_optim.objective=error

One outer step: ask λ candidate φ, run the meta-batch's T inner loops for every candidate
(one ``vmap`` over candidates of ``batched_objective``, itself a ``vmap`` over the T tasks;
a loop over candidates where something cannot run under ``vmap``), score each by the mean
over tasks of a non-differentiable validation objective computed from the predictions,
tell, and set the loss's φ to CMA's mean (``xfavorite``). No hypergradient is computed, so
``hypergrad`` is not used.

Objectives (each per task, from the trained model's validation predictions; lower is better):
``error`` 1 - accuracy, ``balanced_error`` 1 - mean per-class recall, ``macro_f1_loss``
1 - macro-F1, ``iou_loss`` 1 - mean per-image IoU of the thresholded mask, ``recall_error``
1 - Recall@1 of embeddings (retrieval within the validation split); NaN for a model
whose predictions are not finite (so a diverged candidate ranks last). A generation in which
*no* candidate is finite is not told at all (there is nothing to rank): φ stays at the last
good mean, the step counts as skipped, and after ``meta.max_bad_steps`` such generations in
a row the run stops with :class:`metaloss.meta.NonFiniteMetaGradient` and a diagnosis
(σ too large vs. the inner training diverging), as the gradient learner does. They match
:func:`metaloss.metrics.evaluate` (tested) and are written without data-dependent Python
control flow so they run under ``vmap``.

Exact resume without pickle: the checkpoint stores *no* CMA object. A CMA-ES run is a
deterministic function of its settings (x0, σ0, λ, seed) and the fitness values it was told,
because every random draw comes from a private NumPy RNG seeded by ``seed`` (swapped in for
the global ``np.random`` around every ``cma`` call, so nothing else in the process can
consume or perturb it, and the global RNG is left as it was). So the checkpoint holds x0 and
the ``[steps, λ]`` table of told fitness values — plain tensors, loadable with
``torch.load(weights_only=True)``; a row of NaN is a generation that was asked but not told —
and loading *replays* ask/tell (≈0.4 ms per step for
8 parameters: 10,000 steps ≈ 4 s). The replayed mean, σ and covariance are compared
bit-for-bit with copies stored beside the table; a mismatch (e.g. another ``cma`` version)
is refused rather than continued on a different trajectory. Why not pickle: ``cma``'s
object holds functions and option strings that it ``eval``s, and unpickling is code
execution; even a restricted Unpickler would have to allow cma's own callables, which is
an allow-list nobody can audit across cma releases. Replay needs no trust in the file
beyond tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from metaloss import kinds
from metaloss.errors import ConfigError
from metaloss.hypergrad.base import MetaBatch, MetaProblem, batched_objective, meta_params
from metaloss.meta import NonFiniteMetaGradient, check_finite_phi, finish_run, objective_or_nan
from metaloss.metrics import nan_where_diverged, recall_error, zero_one_error

log = logging.getLogger("metaloss")

STATE_KIND = "cmaes/replay-1"


# ---------------------------------------------------------------- true metrics as objectives


def _labels(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, int]:
    """Predicted and true class indices ``[N]`` and the number of classes."""
    if pred.ndim == 1 or pred.shape[-1] == 1:
        guess, c = (pred.reshape(pred.shape[0]) > 0).long(), 2
    else:
        guess, c = pred.argmax(-1), pred.shape[-1]
    return guess, target.reshape(guess.shape).long(), c


def _confusion(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class true positives, false positives, false negatives ``[C]`` (vmap-safe)."""
    guess, y, c = _labels(pred, target)
    classes = torch.arange(c, device=pred.device)
    p, t = guess[:, None] == classes, y[:, None] == classes
    return (
        (p & t).sum(0).to(pred.dtype),
        (p & ~t).sum(0).to(pred.dtype),
        (~p & t).sum(0).to(pred.dtype),
    )


def balanced_error(pred: Tensor, target: Tensor, **_) -> Tensor:
    """1 - balanced accuracy (mean recall over the classes present in ``target``)."""
    tp, _fp, fn = _confusion(pred, target)
    present = (tp + fn) > 0
    recall = tp / (tp + fn).clamp_min(1)
    return nan_where_diverged(pred, 1 - (recall * present).sum() / present.sum().clamp_min(1))


def macro_f1_loss(pred: Tensor, target: Tensor, **_) -> Tensor:
    """1 - macro-F1 over the classes predicted or present (as :func:`metaloss.metrics.evaluate`)."""
    tp, fp, fn = _confusion(pred, target)
    seen = (tp + fp + fn) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    return nan_where_diverged(pred, 1 - (f1 * seen).sum() / seen.sum().clamp_min(1))


def iou_loss(pred: Tensor, target: Tensor, **_) -> Tensor:
    """Per-image 1 - IoU of the mask ``pred > 0`` (an empty prediction of an empty mask: IoU 1)."""
    p = (pred.reshape(pred.shape[0], -1) > 0).to(pred.dtype)
    t = target.reshape(p.shape).to(pred.dtype)
    tp, fp, fn = (p * t).sum(1), (p * (1 - t)).sum(1), ((1 - p) * t).sum(1)
    iou = torch.where((tp + fp + fn) == 0, torch.ones_like(tp), tp / (tp + fp + fn).clamp_min(1))
    return nan_where_diverged(pred, 1 - iou)


OBJECTIVES: dict[str, Callable[..., Tensor]] = {
    "error": zero_one_error,
    "balanced_error": balanced_error,
    "macro_f1_loss": macro_f1_loss,
    "iou_loss": iou_loss,
    "recall_error": recall_error,
}
KINDS = {
    "error": ("classification", "binary"),
    "balanced_error": ("classification", "binary"),
    "macro_f1_loss": ("classification", "binary"),
    "iou_loss": ("segmentation",),
    "recall_error": ("embedding",),
}
DEFAULT_FOR_KIND = kinds.ByKind("search_objective")  # metaloss.kinds: None = the run's own


def config_problems(cfg: Any) -> list[str]:
    """Settings that make no sense with ``meta_optim=cmaes`` (empty: none). ``cfg`` is the
    composed config as a dict; called by :mod:`metaloss.validate` before anything runs."""
    mo = cfg.get("meta_optim") or {}
    if not is_cmaes_target(mo.get("_target_")):
        return []
    return population_search_problems(cfg, "cmaes", "evolves the loss's φ only")


def population_search_problems(cfg: Any, name: str, what: str) -> list[str]:
    """What a derivative-free population search (``meta_optim=<name>``: CMA-ES, the GP)
    cannot do: meta-learn the inner lr, run online, or rank by two objectives."""
    meta, mo, out = cfg.get("meta") or {}, cfg.get("meta_optim") or {}, []
    if meta.get("learn_inner_lr") is True:
        out.append(
            f"meta.learn_inner_lr = true: meta_optim={name} {what}; set "
            "meta.learn_inner_lr=false (tune the inner lr separately, e.g. with "
            "meta_test.tune_learned_lr)"
        )
    if meta.get("mode", "offline") != "offline":
        out.append(
            f"meta.mode = {meta.get('mode')!r}: meta_optim={name} needs meta.mode=offline (each "
            "candidate is trained from fresh initialisations, as in TaylorGLO and EvoMAL)"
        )
    if mo.get("objective") is not None and meta.get("objective") is not None:
        out.append(
            f"meta.objective = {meta.get('objective')!r} and meta_optim.objective = "
            f"{mo.get('objective')!r}: meta_optim={name} optimises one; set "
            "meta.objective=null (or meta_optim.objective=null to use meta.objective)"
        )
    return out


def is_cmaes_target(target: Any) -> bool:
    return isinstance(target, str) and target.rsplit(".", 1)[-1] == "CMAES"


def population_size(popsize: int | None, n_params: int) -> int:
    """λ: ``popsize``, else Hansen's default 4 + ⌊3 ln n⌋ for n parameters (cma's own). The one
    place it is decided: the learner passes it to cma explicitly, and tuning budgets count it."""
    return int(popsize) if popsize is not None else 4 + int(3 * math.log(max(int(n_params), 1)))


# ---------------------------------------------------------------- the learner


class CMAES:
    """CMA-ES over the loss's φ, with :class:`metaloss.meta.MetaLearner`'s interface
    (``step(problem, hypergrad, batch) -> metrics``, ``state_dict``, ``load_state_dict``,
    ``apply_hyperparameters``, ``params``, ``skipped``, ``updates``).

    ``sigma0``: initial step size (φ's own units, for every coordinate); ``popsize``: λ,
    None = cma's default 4 + ⌊3 ln n⌋ (10 for TaylorGLO's 8 parameters); ``seed``: the
    candidate sampling RNG (0 is a seed like any other here, not "time" as in cma);
    ``objective``: a name in :data:`OBJECTIVES`, or None = the task kind's true metric
    (``error`` / ``iou_loss``; regression, or a set ``meta.objective``: the run's own
    objective); ``chunk``: candidates per ``vmap`` call (None: all λ); ``max_bad_steps``:
    generations in a row with no finite candidate before the run stops
    (``meta.max_bad_steps``).
    Built by Hydra as a partial (``conf/meta_optim/cmaes.yaml``), then called with the loss.
    An :class:`metaloss.outer.OuterOptimizer`.
    """

    outer = "cmaes"

    def __init__(
        self,
        loss: nn.Module,
        *,
        sigma0: float = 0.2,
        popsize: int | None = None,
        seed: int = 0,
        objective: str | None = None,
        chunk: int | None = None,
        task_kind: str | None = None,
        max_bad_steps: int = 20,
    ) -> None:
        if not sigma0 > 0 or not math.isfinite(sigma0):
            raise ValueError(f"CMA-ES sigma0 must be a finite number > 0, got {sigma0}")
        if popsize is not None and popsize < 2:
            raise ValueError(f"CMA-ES popsize must be >= 2 or None, got {popsize}")
        if objective is not None and objective not in OBJECTIVES:
            raise ValueError(
                f"unknown CMA-ES objective {objective!r}; valid: None, {', '.join(OBJECTIVES)}"
            )
        if objective is not None and task_kind is not None and task_kind not in KINDS[objective]:
            raise ValueError(
                f"CMA-ES objective {objective!r} is for {' / '.join(KINDS[objective])} tasks, "
                f"not {task_kind}"
            )
        if chunk is not None and chunk < 1:
            raise ValueError(f"CMA-ES chunk must be None or >= 1, got {chunk}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        self.loss = loss
        self.log_lr = None  # the interface of MetaLearner: no learned inner learning rate here
        self.params = dict(meta_params(loss))
        if not self.params or not sum(p.numel() for p in self.params.values()):
            raise ValueError("CMA-ES needs a loss with parameters to evolve")
        check_finite_phi(self.params)
        self.shapes = {k: p.shape for k, p in self.params.items()}
        self.sigma0, self.popsize, self.seed, self.objective, self.chunk = (
            sigma0,
            popsize,
            seed,
            objective,
            chunk,
        )
        self.x0 = self._flat()
        self.skipped = 0  # generations with no finite candidate (asked, not told)
        self.diverged = 0  # candidates whose objective was not finite, in total
        self.bad_steps = 0  # such generations in a row
        self.max_bad_steps = int(max_bad_steps)
        self._last_bad: tuple[Any, Any, Any] | None = (
            None  # (problem, None, batch) of the last skipped step
        )
        self._no_vmap = False
        self._np_state: Any = None  # the private NumPy RNG's state (set by _start)
        self._start(self.x0)

    @classmethod
    def for_run(
        cls, make: Callable, loss: nn.Module, cfg: Any, task_kind: str, world_size: int = 1
    ) -> CMAES:
        """Build from the run's composed config, refusing what makes no sense (ConfigError)."""
        found = config_problems(
            {"meta": plain_dict(cfg.meta), "meta_optim": plain_dict(cfg.meta_optim)}
        )
        if world_size > 1:
            found.append(
                f"meta_optim=cmaes runs in one process; launch it without torchrun ({world_size} "
                "processes)"
            )
        if found:
            raise ConfigError("invalid settings (nothing was run):\n  " + "\n  ".join(found))
        name = cfg.meta_optim.get("objective")
        if name is None and cfg.meta.get("objective") is None:
            name = DEFAULT_FOR_KIND.get(task_kind)  # regression: the run's own objective (mse)
        try:
            learner = make(
                loss,
                objective=name,
                task_kind=task_kind,
                max_bad_steps=int(cfg.meta.get("max_bad_steps", 20)),
            )
        except ValueError as e:
            raise ConfigError(f"meta_optim=cmaes: {e}") from e
        if learner.x0.size > 100:
            log.warning(
                "meta_optim=cmaes on %d loss parameters: CMA-ES adapts a full %d x %d covariance "
                "and "
                "needs many more candidates as φ grows; it is meant for small φ (TaylorGLO: 8)",
                learner.x0.size,
                learner.x0.size,
                learner.x0.size,
            )
        log.info(
            "meta_optim=cmaes: CMA-ES needs no hypergradient (hypergrad=%s is not used); "
            "λ=%d candidates × T tasks per step on objective %s, σ0=%g, seed=%d",
            cfg.hypergrad.get("_target_", "?").rsplit(".", 1)[-1],
            learner.es.popsize,
            name or "meta.objective",
            learner.sigma0,
            learner.seed,
        )
        return learner

    # -- cma, on a private RNG

    @contextmanager
    def _rng(self) -> Iterator[None]:
        """Run cma with the private NumPy RNG as ``np.random`` (cma samples from the global
        one); the caller's global state is put back afterwards."""
        outer = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            yield
        finally:
            self._np_state = np.random.get_state()
            np.random.set_state(outer)

    def _start(self, x0: np.ndarray) -> None:
        import cma  # here, not at the top: ~2 s to import, and only a CMA-ES run needs it

        self._np_state = np.random.RandomState(self.seed).get_state()
        opts = {
            "seed": np.nan,  # cma: "do nothing" (its seed 0 would mean "time"); we seed _np_state
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,  # no console output, no outcmaes/ files
            # meta.steps decides when to stop; never let a termination criterion matter
            "tolflatfitness": np.inf,
            "tolfun": 0,
            "tolfunhist": 0,
            "tolx": 0,
            "tolstagnation": np.inf,
            "maxiter": np.inf,
            "maxfevals": np.inf,
        }
        opts["popsize"] = population_size(self.popsize, len(x0))
        with self._rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(
                np.array(x0, dtype=np.float64), float(self.sigma0), opts
            )
        self.history: list[list[float]] = []  # fitness told at each step: the replayable state
        self.updates = 0  # generations told (a row of NaN in history: asked, not told)

    def _ask_tell(self, evaluate: Callable[[np.ndarray], list[float]]) -> None:
        # the private NumPy stream is swapped in around cma's own calls only, not training
        with self._rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cands = np.asarray(self.es.ask(), dtype=np.float64)
        fitness = [float(f) for f in evaluate(cands)]
        if all(math.isnan(f) for f in fitness):  # nothing to rank: ask again next step, φ stays
            self.history.append(fitness)
            return
        with self._rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(list(cands), fitness)
        self.history.append(fitness)
        self.updates += 1
        self._set_phi(self.mean)

    def generation(self, evaluate: Callable[[np.ndarray], list[float]]) -> None:
        """One ask / evaluate / tell outside the supervised engine (e.g. :mod:`metaloss.rl`):
        ``evaluate(candidates [λ, n]) -> λ fitness values`` (lower is better, NaN: diverged);
        φ is then set to the new mean. A diverged candidate ranks last (NaN is told as the worst
        finite value + 1, as :meth:`step` does); a generation of NaN only is asked, not told."""

        def ranked(cands: np.ndarray) -> list[float]:
            values = [float(v) for v in evaluate(cands)]
            finite = [v for v in values if math.isfinite(v)]
            if not finite:
                return [float("nan")] * len(values)
            worst = max(finite) + 1
            return [v if math.isfinite(v) else worst for v in values]

        self._ask_tell(ranked)

    def set_candidate(self, x: np.ndarray) -> None:
        """Set the loss's φ to the flat candidate ``x`` (one row of what ``evaluate`` gets)."""
        self._set_phi(x)

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.es.result.xfavorite, dtype=np.float64)

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    # -- φ as one vector

    def _flat(self) -> np.ndarray:
        return np.concatenate(
            [p.detach().double().cpu().reshape(-1).numpy() for p in self.params.values()]
        )

    def _unflat(self, x: Tensor) -> dict[str, Tensor]:
        """``x`` ``[..., n]`` -> ``{name: [..., *shape]}``."""
        out, i = {}, 0
        for k, shape in self.shapes.items():
            n = math.prod(shape)
            out[k] = x[..., i : i + n].reshape(tuple(x.shape[:-1]) + tuple(shape))
            i += n
        return out

    def _set_phi(self, x: np.ndarray) -> None:
        ref = next(iter(self.params.values()))
        vals = self._unflat(torch.as_tensor(x, dtype=torch.float64))
        with torch.no_grad():  # no meta-graph here: φ is set, not differentiated
            for k, p in self.params.items():
                p.copy_(vals[k].to(device=ref.device, dtype=p.dtype))

    # -- one outer step

    def fitness_problem(self, problem: MetaProblem) -> MetaProblem:
        """``problem`` with the objective CMA-ES ranks candidates by (a true metric when
        ``objective`` names one); held-out selection (metaloss.selection) scores by it too."""
        if self.objective is None:
            return problem
        return dataclasses.replace(problem, objective=OBJECTIVES[self.objective])

    def step(self, problem: MetaProblem, hypergrad: Any, batch: MetaBatch) -> dict[str, float]:
        """Ask λ candidates, score each on the batch's T tasks, tell; φ := CMA's mean.
        ``hypergrad`` is ignored (CMA-ES needs no hypergradient)."""
        problem = self.fitness_problem(problem)
        seen: dict[str, Any] = {}

        def evaluate(cands: np.ndarray) -> list[float]:
            ref = next(iter(self.params.values()))
            x = torch.as_tensor(cands).to(device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                values = self._evaluate(problem, self._unflat(x), batch).double().cpu()
            finite = torch.isfinite(values)
            seen["values"], seen["finite"] = values, finite
            if not finite.any():  # no candidate to rank: not told (see _ask_tell)
                return [float("nan")] * len(values)
            # a diverged candidate gets a fitness worse than every finite one (CMA uses ranks)
            worst = float(values[finite].max()) + 1
            return torch.where(finite, values, torch.full_like(values, worst)).tolist()

        self._ask_tell(evaluate)
        values, finite = seen["values"], seen["finite"]
        self.diverged += int((~finite).sum())
        if not bool(finite.any()):
            self.bad_steps += 1
            self.skipped += 1
            self._last_bad = (problem, None, batch)
            log.warning(
                "CMA-ES: all %d candidates diverged (σ = %.4g): generation skipped, φ unchanged "
                "(%d in a row)",
                len(values),
                self.sigma,
                self.bad_steps,
            )
            if self.bad_steps >= self.max_bad_steps:
                cause, advice = self.diagnose(problem, batch)
                raise NonFiniteMetaGradient(
                    f"{self.bad_steps} consecutive CMA-ES generations had no candidate "
                    f"with a finite objective. {advice}",
                    cause,
                )
        else:
            self.bad_steps = 0
        good = values[finite]
        return {
            "meta/val_objective": float(good.mean()) if len(good) else float("nan"),
            "meta/best_objective": float(good.min()) if len(good) else float("nan"),
            "meta/sigma": self.sigma,
            "meta/diverged": float(self.diverged),
            "meta/skipped": float(self.skipped),
        }

    def _evaluate(self, problem: MetaProblem, cands: dict[str, Tensor], batch: MetaBatch) -> Tensor:
        """The mean objective over the T tasks of each candidate ``[λ]``."""
        if not self._no_vmap:
            try:
                return torch.vmap(
                    lambda m: batched_objective(problem, m, batch), chunk_size=self.chunk
                )(cands)
            except torch.OutOfMemoryError:
                raise  # lower meta_optim.chunk (candidates per vmap call)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                self._no_vmap = True
                warnings.warn(
                    f"CMA-ES: the candidates cannot be evaluated under vmap ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); falling back to a loop",
                    RuntimeWarning,
                    stacklevel=3,
                )
        n = next(iter(cands.values())).shape[0]
        return torch.stack(
            [
                batched_objective(problem, {k: v[c] for k, v in cands.items()}, batch)
                for c in range(n)
            ]
        )

    # -- failures

    def diagnose(
        self, problem: MetaProblem | None, batch: MetaBatch | None, hypergrad: Any = None
    ) -> tuple[str, str]:
        """Why no candidate was finite: train this batch with the *initial* φ and with CMA's
        current mean. Initial not finite: the inner training diverges whatever φ (inner lr).
        Mean finite: the candidates around it are spread too far (σ). Mean not finite but the
        initial φ finite: CMA-ES moved its mean into an unstable region (σ too)."""
        ref = next(iter(self.params.values()))

        def at(x: np.ndarray) -> float:
            return objective_or_nan(
                problem,
                {
                    k: v.to(device=ref.device, dtype=ref.dtype)
                    for k, v in self._unflat(torch.as_tensor(x, dtype=torch.float64)).items()
                },
                batch,
            )

        at_init, at_mean = at(self.x0), at(self.mean)
        sigma = (
            f"CMA-ES's step size σ is now {self.sigma:.4g} (meta_optim.sigma0 = {self.sigma0:g}, "
            f"λ = {self.es.popsize} candidates)"
        )
        if not math.isfinite(at_init):
            return "inner", (
                "The inner training diverges even with the initial φ: likely cause the INNER "
                "learning "
                "rate. Lower optim.lr or meta.inner_steps."
            )
        if math.isfinite(at_mean):
            return "sigma", (
                f"CMA-ES's mean φ trains finitely on this batch (objective {at_mean:.4g}) but "
                "every "
                f"candidate sampled around it diverged: {sigma}, too wide for the stable region. "
                "Lower "
                "meta_optim.sigma0."
            )
        return "meta", (
            f"With the initial φ this batch trains finitely (objective {at_init:.4g}) but CMA-ES's "
            "mean "
            f"does not: the search moved into an unstable region after {self.updates} generations; "
            f"{sigma}. Lower meta_optim.sigma0 (or optim.lr)."
        )

    def finish(self) -> str | None:
        """After the last generation: no generation ever told (every candidate of every step
        diverged) is a failure, never a complete result (:func:`metaloss.meta.finish_run`)."""
        return finish_run(self)

    # -- the MetaLearner interface for resume

    def apply_hyperparameters(self, make_optimizer: Callable) -> dict[str, tuple[Any, Any]]:
        """Nothing to apply: every CMA-ES setting is part of the run's identity, so a changed
        one is refused on resume before this is called."""
        return {}

    def state_dict(self) -> dict:
        """Tensors and plain containers only (``torch.load(weights_only=True)``): x0 and the
        fitness table to replay, and the mean, σ and C that the replay must reproduce."""
        lam = self.es.popsize
        return copy.deepcopy(
            {
                "kind": STATE_KIND,
                "loss": self.loss.state_dict(),
                "x0": torch.as_tensor(self.x0, dtype=torch.float64),
                "fitness": torch.tensor(self.history, dtype=torch.float64).reshape(
                    len(self.history), lam
                ),
                "mean": torch.as_tensor(self.mean, dtype=torch.float64),
                "sigma": torch.tensor(self.sigma, dtype=torch.float64),
                "C": torch.as_tensor(np.asarray(self.es.sm.C, dtype=np.float64)),
                "counters": {
                    "updates": self.updates,
                    "skipped": self.skipped,
                    "diverged": self.diverged,
                    "bad_steps": self.bad_steps,
                },
            }
        )

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise ValueError(
                "the checkpoint's meta-learner state is not a CMA-ES state "
                f"({STATE_KIND}); it was made with another meta_optim"
            )
        x0 = state["x0"].double().numpy()
        fitness = state["fitness"].double()
        if x0.shape != self.x0.shape:
            raise ValueError(
                f"CMA-ES state over {x0.size} parameters, this loss has {self.x0.size}"
            )
        self.loss.load_state_dict(state["loss"])
        self.x0 = x0
        self._start(x0)
        if fitness.ndim != 2 or (len(fitness) and fitness.shape[1] != self.es.popsize):
            raise ValueError(
                f"CMA-ES fitness table of shape {tuple(fitness.shape)} does not fit popsize "
                f"{self.es.popsize}"
            )
        rows = fitness.tolist()
        for row in rows:
            self._ask_tell(_constant(row))
        import cma  # for its version only (imported here for the same reason as in _start)

        for name, want, got in (
            ("mean", state["mean"], torch.as_tensor(self.mean)),
            ("sigma", state["sigma"], torch.tensor(self.sigma, dtype=torch.float64)),
            ("C", state["C"], torch.as_tensor(np.asarray(self.es.sm.C, dtype=np.float64))),
        ):
            if not torch.equal(want.double(), got):
                raise ValueError(
                    f"replaying {len(rows)} CMA-ES steps did not reproduce the checkpointed "
                    f"{name} (cma {cma.__version__} here: was the checkpoint made with another "
                    "cma version?); refusing to continue on a different trajectory"
                )
        counters = state.get("counters") or {}
        self.skipped = int(counters.get("skipped", 0))
        self.diverged = int(counters.get("diverged", 0))
        self.bad_steps = int(counters.get("bad_steps", 0))


def _constant(row: list[float]) -> Callable[[np.ndarray], list[float]]:
    return lambda _cands: row


def plain_dict(cfg: Any) -> dict:
    """A config node as a plain dict (resolved), {} for anything else: what the outer
    optimizers' ``config_problems`` read."""
    out = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return dict(out) if isinstance(out, dict) else {}
