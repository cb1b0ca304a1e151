"""Genetic programming over symbolic losses: ``loss=symbolic meta_optim=gp``.

The search of EvoMAL (Raymond, Chen, Zhang & Xue, "Learning Symbolic Model-Agnostic Loss
Functions via Meta-Learning", IEEE TPAMI 2023, arXiv:2209.08907), after GLO (Gonzalez &
Miikkulainen, CEC 2020): a population of expression trees (:mod:`metaloss.losses.symbolic`)
evolves by tournament selection, subtree crossover and mutation (Koza, "Genetic
Programming", 1992) on a true validation metric after a short training run; then the best
tree's constants are refined by unrolled hypergradients through the engine, EvoMAL's
second, gradient-based stage::

    metaloss-meta experiment=gp_quickstart
    metaloss-meta task=mnist1d loss=symbolic meta_optim=gp meta_optim.generations=20 meta.steps=30

One outer step is one generation while ``step < generations`` and one gradient step on the
best tree's constants after that (Adam at ``refine_lr`` on the run's ``hypergrad``).

**Fitness with common random numbers.** Every candidate of a generation trains on the same
meta-batch: the same T initialisations and inner batches (the T tasks play the part of
seeds), scored by the mean over them of the objective (``objective``: a true metric as for
CMA-ES, :data:`metaloss.cmaes.OBJECTIVES`); a tree that diverges ranks last.
The whole population trains in one loop: the P × T models' forward pass is one ``vmap``,
each tree is applied to its slice of the shared softmax (one small elementwise program per
tree), one backward pass gives every model its own gradient, and the (elementwise) inner
optimizer updates all P × T models at once. ``scripts/bench_search.py`` times this against
one candidate and seed at a time, the way EvoMAL's code evaluates, and checks both give the
same fitness.

**Rejection before training.** A new tree is kept only if it fits the size limits
(``max_depth``, the loss's ``max_nodes`` and ``max_constants``) and passes
:func:`metaloss.losses.symbolic.shape_problem` (finite with finite gradients, not constant,
lower at the target than away from it); otherwise it is drawn again.

**Why not DEAP.** DEAP's operators draw from Python's global ``random`` and compile trees with
``eval``; here every draw comes from a private NumPy generator (so the run replays exactly)
and a tree is only ever interpreted from its tokens (a file is data). The operators are
the textbook ones and short.

**Exact resume without pickle**, as for CMA-ES: a GP run is a deterministic function of its
settings and the fitness values it saw, so the checkpoint holds the table of fitness values
(``[generations, P]``) and the current population as tensors; loading replays the breeding
and refuses to continue if the replayed population differs from the saved one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaloss.cmaes import (
    DEFAULT_FOR_KIND,
    KINDS,
    OBJECTIVES,
    plain_dict,
    population_search_problems,
)
from metaloss.errors import ConfigError
from metaloss.hypergrad.base import LOSS_PREFIX, MetaBatch, MetaProblem, task_objective
from metaloss.losses import symbolic as sym
from metaloss.meta import MetaLearner, NonFiniteMetaGradient

log = logging.getLogger("metaloss")

STATE_KIND = "gp/replay-1"
CONSTANT_CHOICES = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)  # ephemeral constants of new leaves
MAX_TRIES = 100  # draws of a valid offspring before its parent is copied instead
INIT_TRIES = 1000  # draws per tree of the first generation before the settings are refused


def is_gp_target(target: Any) -> bool:
    return isinstance(target, str) and target.rsplit(".", 1)[-1] == "GeneticProgramming"


def config_problems(cfg: Any) -> list[str]:
    """Settings that make no sense with ``meta_optim=gp`` (empty: none); ``cfg`` is the
    composed config as a dict (:mod:`metaloss.validate` calls this before anything runs)."""
    mo, loss = cfg.get("meta_optim") or {}, cfg.get("loss") or {}
    if not is_gp_target(mo.get("_target_")):
        return []
    out = population_search_problems(cfg, "gp", "searches the loss only")
    pop = mo.get("popsize")
    if pop is None or isinstance(pop, bool) or not isinstance(pop, int):
        out.append(f"meta_optim.popsize = {pop!r}: meta_optim=gp needs a number of trees (>= 2)")
    else:
        for key, limit, rel in (("tournament", pop, "<="), ("elites", pop - 1, "<=")):
            v = mo.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > limit:
                out.append(
                    f"meta_optim.{key} = {v}: must be {rel} {limit} (meta_optim.popsize = {pop}"
                    + (", one tree must be bred)" if key == "elites" else ")")
                )
    init, deepest = mo.get("init_depth"), mo.get("max_depth")
    if isinstance(init, int) and isinstance(deepest, int) and init > deepest:
        out.append(f"meta_optim.init_depth = {init}: must be <= meta_optim.max_depth ({deepest})")
    if str(loss.get("_target_", "")).rsplit(".", 1)[-1] != "SymbolicLoss":
        out.append(
            f"meta_optim=gp searches expression trees: it needs loss=symbolic, not "
            f"{loss.get('_target_')}"
        )
    return out


# ---------------------------------------------------------------- fitness, batched


def population_objective(
    problem: MetaProblem, trees: Sequence[Sequence[sym.Token]], batch: MetaBatch
) -> Tensor:
    """The mean objective over the batch's T tasks of every tree ``[P]`` (NaN: diverged),
    all P × T inner runs in one loop. Same numbers as :func:`sequential_objective`."""
    fns, consts = [], []
    ref = next(iter(batch.theta0.values()))
    for tree in trees:
        fn, values = sym.compile_tokens(tree)
        fns.append(fn)
        consts.append(values.to(device=ref.device, dtype=ref.dtype))
    n_pop = len(trees)
    model, opt = problem.model, problem.inner_opt

    def forward(theta: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, theta, (x,))

    # the P × T models as one batch of models (one vmap over P·T is faster than a vmap over P
    # of a vmap over T); every candidate sees the same T batches (common random numbers)
    each = torch.vmap(forward)

    def repeat(t: Tensor) -> Tensor:  # [T, ...] -> [P·T, ...]
        return t.expand(n_pop, *t.shape).reshape(-1, *t.shape[1:])

    theta = {k: repeat(v).clone() for k, v in batch.theta0.items()}
    n_tasks = next(iter(batch.theta0.values())).shape[0]
    state = opt.init(theta)  # elementwise optimizers: stacked parameters are fine
    for k in range(problem.inner_steps):
        x, y = repeat(batch.x_train[:, k]), repeat(batch.y_train[:, k])
        theta = {name: v.detach().requires_grad_(True) for name, v in theta.items()}
        with torch.enable_grad():
            pred = each(theta, x)  # [P·T, N, ...]
            y_in, f, regression = sym.loss_inputs(
                pred.reshape(-1, *pred.shape[2:]), y.reshape(-1, *y.shape[2:])
            )
            y_in = y_in.reshape(n_pop, -1, y_in.shape[-1])
            f = f.reshape(n_pop, -1, f.shape[-1])
            total = pred.new_zeros(())
            for c, fn in enumerate(fns):  # each tree on its own models' predictions
                per_example = sym.reduce(fn(y_in[c], f[c], consts[c]), regression)
                total = total + per_example.reshape(n_tasks, -1).mean(-1).sum()
            grads = torch.autograd.grad(total, list(theta.values()))
        g = dict(zip(theta, grads, strict=True))
        theta, state = opt.update(g, state, {n: v.detach() for n, v in theta.items()})
    with torch.no_grad():
        pred = each(theta, repeat(batch.x_val))  # [P·T, M, ...]

        def score(p: Tensor, yv: Tensor) -> Tensor:
            return problem.objective(p, yv, **problem.objective_context).mean()

        values = torch.vmap(score)(pred, repeat(batch.y_val))
    return values.reshape(n_pop, n_tasks).mean(-1)


def sequential_objective(
    problem: MetaProblem, trees: Sequence[Sequence[sym.Token]], batch: MetaBatch
) -> Tensor:
    """The same fitness as :func:`population_objective`, one candidate and one task at a time
    (the way EvoMAL's code evaluates): the reference for the benchmark and the tests."""
    out = []
    n_tasks = next(iter(batch.theta0.values())).shape[0]
    for tree in trees:
        loss = sym.SymbolicLoss(sym.to_text(tree), max_nodes=len(tree), max_constants=len(tree))
        loss = loss.to(next(iter(batch.theta0.values())).dtype)
        one = dataclasses.replace(problem, loss=loss)
        meta = {LOSS_PREFIX + "constants": loss.constants.detach()}
        with torch.no_grad():
            values = [
                task_objective(
                    one,
                    meta,
                    {k: v[t] for k, v in batch.theta0.items()},
                    batch.x_train[t],
                    batch.y_train[t],
                    batch.x_val[t],
                    batch.y_val[t],
                )
                for t in range(n_tasks)
            ]
        out.append(torch.stack(values).mean())
    return torch.stack(out)


# ---------------------------------------------------------------- the outer optimizer


class GeneticProgramming:
    """A population of symbolic losses evolved on a true metric, then the best tree's
    constants refined by hypergradients (the module docstring has the algorithm).

    ``popsize``: P trees per generation; ``generations``: outer steps that evolve (the rest
    of ``meta.steps`` refine constants); ``seed``: the private RNG of every draw;
    ``objective``: a name in :data:`metaloss.cmaes.OBJECTIVES` or None (the task kind's);
    ``tournament``: trees per tournament; ``crossover`` / ``mutation``: probabilities per
    offspring; ``elites``: best trees copied unchanged; ``init_depth``: the deepest tree of
    the ramped half-and-half start; ``max_depth``: the deepest tree kept; ``refine_lr``:
    Adam's lr on the constants. The loss's own starting expression is one tree of the first
    generation (a warm start: cross-entropy, say, begins in the population).
    An :class:`metaloss.outer.OuterOptimizer`.
    """

    outer = "gp"

    def __init__(
        self,
        loss: nn.Module,
        *,
        popsize: int = 25,
        generations: int = 10,
        seed: int = 0,
        objective: str | None = None,
        tournament: int = 4,
        crossover: float = 0.7,
        mutation: float = 0.25,
        elites: int = 1,
        init_depth: int = 3,
        max_depth: int = 6,
        refine_lr: float = 1e-3,
        task_kind: str = "classification",
        max_bad_steps: int = 20,
    ) -> None:
        if not isinstance(loss, sym.SymbolicLoss):
            raise ValueError(f"meta_optim=gp needs loss=symbolic, not {type(loss).__name__}")
        checks = {
            "popsize": (popsize, 2, 100_000),
            "generations": (generations, 1, 10**7),
            "tournament": (tournament, 1, popsize),
            "elites": (elites, 0, popsize - 1),
            "init_depth": (init_depth, 1, max_depth),
            "max_depth": (max_depth, 1, 64),
            "max_bad_steps": (max_bad_steps, 1, 10**7),
        }
        for name, (v, lo, hi) in checks.items():
            if not lo <= int(v) <= hi:
                raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
        for name, p in (("crossover", crossover), ("mutation", mutation)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if not refine_lr > 0 or not math.isfinite(refine_lr):
            raise ValueError(f"refine_lr must be a finite number > 0, got {refine_lr}")
        if objective is not None and objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {objective!r}; valid: None, {', '.join(OBJECTIVES)}"
            )
        if objective is not None and task_kind not in KINDS[objective]:
            raise ValueError(
                f"objective {objective!r} is for {' / '.join(KINDS[objective])} tasks, not "
                f"{task_kind}"
            )
        reason = sym.shape_problem(loss.tokens(), task_kind)
        if reason is not None:
            raise ValueError(f"the starting expression {loss.expression()} is no loss: {reason}")
        if sym.depth(loss.tokens()) > max_depth:
            raise ValueError(
                f"the starting expression {loss.expression()} is {sym.depth(loss.tokens())} deep, "
                f"more than max_depth = {max_depth}"
            )
        self.loss = loss
        self.log_lr = None  # no meta-learned inner lr
        self.params = {
            LOSS_PREFIX + "constants": loss.constants,
            LOSS_PREFIX + "program": loss.program,
        }
        self.popsize, self.generations, self.seed = int(popsize), int(generations), int(seed)
        self.objective, self.task_kind = objective, task_kind
        self.tournament, self.crossover, self.mutation = int(tournament), crossover, mutation
        self.elites, self.init_depth, self.max_depth = int(elites), int(init_depth), int(max_depth)
        self.refine_lr = float(refine_lr)
        self.max_nodes, self.max_constants = loss.capacity
        self.max_bad_steps = int(max_bad_steps)
        self.start = loss.tokens()
        self.skipped = self.bad_steps = self.updates = self.diverged = 0
        self.generation = 0
        self._last_bad: tuple[Any, Any, Any] | None = None
        self.refiner: MetaLearner | None = None
        self.best: tuple[list[sym.Token], float] | None = None
        self.table: list[list[Any]] = []  # per generation: its best trees (the W&B table)
        self.history: list[list[float]] = []  # fitness of every generation: the replayable state
        self.skipped_gp = 0  # generations skipped before the refinement began
        self.refine_stopped = ""  # why the refinement stopped early ("": it did not)
        self._init_population()

    @classmethod
    def for_run(
        cls, make: Callable, loss: nn.Module, cfg: Any, task_kind: str, world_size: int = 1
    ) -> GeneticProgramming:
        """Build from the run's composed config, refusing what makes no sense (ConfigError)."""
        plain = {k: plain_dict(cfg.get(k)) for k in ("meta", "meta_optim", "loss")}
        found = config_problems(plain)
        if world_size > 1:
            found.append(
                f"meta_optim=gp runs in one process; launch it without torchrun "
                f"({world_size} processes)"
            )
        if found:
            raise ConfigError("invalid settings (nothing was run):\n  " + "\n  ".join(found))
        name = cfg.meta_optim.get("objective")
        if name is None and cfg.meta.get("objective") is None:
            name = DEFAULT_FOR_KIND.get(task_kind)
        try:
            learner = make(
                loss,
                objective=name,
                task_kind=task_kind,
                max_bad_steps=int(cfg.meta.get("max_bad_steps", 20)),
            )
        except ValueError as e:
            raise ConfigError(f"meta_optim=gp: {e}") from e
        if int(cfg.meta.steps) < learner.generations:
            log.warning(
                "meta_optim=gp: meta.steps = %d < meta_optim.generations = %d: the search stops "
                "after %d generations, and no constants are refined",
                int(cfg.meta.steps),
                learner.generations,
                int(cfg.meta.steps),
            )
        log.info(
            "meta_optim=gp: %d trees × T tasks per generation for %d generations on objective "
            "%s, then %d steps refining the best tree's constants (hypergrad=%s), seed=%d",
            learner.popsize,
            learner.generations,
            name or "meta.objective",
            max(int(cfg.meta.steps) - learner.generations, 0),
            cfg.hypergrad.get("_target_", "?").rsplit(".", 1)[-1],
            learner.seed,
        )
        return learner

    # -- trees

    def _random_tree(self, depth: int, full: bool) -> list[sym.Token]:
        rng = self.rng
        if depth == 0 or (not full and rng.random() < 0.3):
            r = rng.random()
            if r < 0.4:
                return ["y"]
            if r < 0.8:
                return ["f"]
            return [float(CONSTANT_CHOICES[rng.integers(len(CONSTANT_CHOICES))])]
        names = list(sym.PRIMITIVES)
        name = names[rng.integers(len(names))]
        out: list[sym.Token] = [name]
        for _ in range(sym.PRIMITIVES[name][0]):
            out += self._random_tree(depth - 1, full)
        return out

    def _valid(self, tree: Sequence[sym.Token]) -> bool:
        return (
            len(tree) <= self.max_nodes
            and sym.n_constants(tree) <= self.max_constants
            and sym.depth(tree) <= self.max_depth
            and sym.shape_problem(tree, self.task_kind) is None
        )

    def _init_population(self) -> None:
        """The loss's starting tree plus ramped half-and-half trees of depth 1..init_depth;
        a ValueError naming the settings if they leave too few valid trees to draw."""
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        pop = [list(self.start)]
        tries = 0
        while len(pop) < self.popsize:
            i = tries
            tries += 1
            if tries > INIT_TRIES * self.popsize:
                raise ValueError(
                    f"could draw only {len(pop)} of {self.popsize} trees that fit the limits "
                    f"(init_depth = {self.init_depth}, max_depth = {self.max_depth}, "
                    f"loss.max_nodes = {self.max_nodes}, loss.max_constants = "
                    f"{self.max_constants}) and pass the shape checks for {self.task_kind} in "
                    f"{INIT_TRIES * self.popsize} draws: "
                    "raise meta_optim.init_depth or the limits"
                )
            tree = self._random_tree(1 + i % self.init_depth, full=bool(i % 2))
            if self._valid(tree):
                pop.append(tree)
        self.population = pop

    def _pick(self, order: np.ndarray) -> list[sym.Token]:
        """Tournament selection: the best of ``tournament`` trees drawn with replacement
        (``order``: each tree's rank, 0 best)."""
        idx = self.rng.integers(self.popsize, size=self.tournament)
        return list(self.population[int(idx[np.argmin(order[idx])])])

    def _crossover(self, a: list[sym.Token], b: list[sym.Token]) -> list[sym.Token]:
        i = int(self.rng.integers(len(a)))
        j = int(self.rng.integers(len(b)))
        return a[:i] + b[j : sym.subtree_end(b, j)] + a[sym.subtree_end(a, i) :]

    def _mutate(self, a: list[sym.Token]) -> list[sym.Token]:
        i = int(self.rng.integers(len(a)))
        r = self.rng.random()
        if r < 0.5:  # subtree mutation
            new = self._random_tree(int(self.rng.integers(1, 3)), full=False)
            return a[:i] + new + a[sym.subtree_end(a, i) :]
        if r < 0.75:  # point mutation: a node of the same arity
            tok = a[i]
            arity = sym.PRIMITIVES[tok][0] if isinstance(tok, str) and tok in sym.PRIMITIVES else 0
            same = (
                [n for n, (k, _) in sym.PRIMITIVES.items() if k == arity] if arity else ["y", "f"]
            )
            return a[:i] + [same[int(self.rng.integers(len(same)))]] + a[i + 1 :]
        consts = [k for k, t in enumerate(a) if isinstance(t, float)]  # jitter a constant
        if not consts:
            return a
        k = consts[int(self.rng.integers(len(consts)))]
        value = float(a[k]) * float(np.exp(self.rng.normal(0, 0.5)))
        return a[:k] + [round(value, 4)] + a[k + 1 :]

    def _breed(self, fitness: np.ndarray) -> None:
        """The next generation from this one's fitness (NaN ranks last)."""
        order = np.argsort(
            np.argsort(np.where(np.isnan(fitness), np.inf, fitness), kind="stable"), kind="stable"
        )
        ranked = np.argsort(order, kind="stable")
        new = [list(self.population[int(i)]) for i in ranked[: self.elites]]
        while len(new) < self.popsize:
            parent = self._pick(order)
            child = parent
            for _ in range(MAX_TRIES):
                child = parent
                if self.rng.random() < self.crossover:
                    child = self._crossover(parent, self._pick(order))
                if self.rng.random() < self.mutation:
                    child = self._mutate(child)
                if self._valid(child):
                    break
            else:
                child = parent
            new.append(child)
        self.population = new

    # -- one outer step

    def fitness_problem(self, problem: MetaProblem) -> MetaProblem:
        """``problem`` with the objective the trees are ranked by (selection scores by it too)."""
        if self.objective is None:
            return problem
        return dataclasses.replace(problem, objective=OBJECTIVES[self.objective])

    def step(self, problem: MetaProblem, hypergrad: Any, batch: MetaBatch) -> dict[str, float]:
        if self.generation >= self.generations:
            return self._refine(problem, hypergrad, batch)
        fit_problem = self.fitness_problem(problem)
        values = population_objective(fit_problem, self.population, batch).double().cpu()
        return self._tell(values.numpy(), problem, batch)

    def _tell(self, fitness: np.ndarray, problem: Any, batch: Any) -> dict[str, float]:
        finite = np.isfinite(fitness)
        self.history.append(fitness.tolist())
        self.diverged += int((~finite).sum())
        if finite.any():
            best = int(np.nanargmin(np.where(finite, fitness, np.nan)))
            self.loss.set_tokens(self.population[best])  # φ: this generation's best tree
            self.best = (list(self.population[best]), float(fitness[best]))
            self.updates += 1
            self.bad_steps = 0
            self._record(fitness)
        else:
            self.bad_steps += 1
            self.skipped += 1
            self._last_bad = (problem, None, batch)
            log.warning(
                "GP: every tree of generation %d diverged (%d in a row)",
                self.generation,
                self.bad_steps,
            )
            if self.bad_steps >= self.max_bad_steps:
                raise NonFiniteMetaGradient(
                    f"{self.bad_steps} consecutive GP generations had no tree with a finite "
                    "objective: the inner training diverges whatever the loss; lower optim.lr "
                    "or meta.inner_steps",
                    "inner",
                )
        self._breed(fitness)
        self.generation += 1
        good = fitness[finite]
        sizes = [len(t) for t in self.population]
        return {
            "meta/val_objective": float(good.mean()) if len(good) else float("nan"),
            "meta/best_objective": float(good.min()) if len(good) else float("nan"),
            "meta/diverged": float(self.diverged),
            "meta/skipped": float(self.skipped),
            "meta/mean_size": float(np.mean(sizes)),
            "meta/unique": float(len({sym.to_text(t) for t in self.population})),
        }

    def _record(self, fitness: np.ndarray, top: int = 3) -> None:
        order = np.argsort(np.where(np.isfinite(fitness), fitness, np.inf), kind="stable")
        for rank, i in enumerate(order[:top]):
            if not np.isfinite(fitness[i]):
                break
            tree = self.population[int(i)]
            self.table.append(
                [
                    self.generation,
                    rank,
                    float(fitness[i]),
                    len(tree),
                    sym.to_text(tree),
                    sym.pretty(tree),
                ]
            )
        best = self.population[int(order[0])]
        log.info(
            "GP generation %d: best %.4g  %s", self.generation, fitness[order[0]], sym.pretty(best)
        )

    def tables(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """What to log as W&B tables: each generation's best trees so far."""
        cols = ["generation", "rank", "fitness", "nodes", "expression", "simplified"]
        return {"meta/gp_trees": (cols, [list(r) for r in self.table])}

    def _refine(self, problem: MetaProblem, hypergrad: Any, batch: MetaBatch) -> dict[str, float]:
        """EvoMAL's second stage: a gradient step on the best tree's constants. A tree without
        constants has nothing to refine; a refinement that diverges (``meta.max_bad_steps``
        non-finite steps in a row) stops, and φ stays the last good one: the search's result
        is kept either way (:meth:`finish` says so)."""
        if self.refine_stopped:
            return {}
        if self.refiner is None:
            if sym.n_constants(self.loss.tokens()) == 0:
                self.refine_stopped = "the best tree has no constants to refine"
                log.info("GP: %s; the remaining outer steps do nothing", self.refine_stopped)
                return {}
            self.refiner = self._make_refiner()
        try:
            out = self.refiner.step(problem, hypergrad, batch)
        except NonFiniteMetaGradient as e:
            self.refine_stopped = f"the refinement diverged ({e})"
            log.warning("GP: %s; φ stays the last good one", self.refine_stopped)
            return {}
        self.skipped = self.skipped_gp + self.refiner.skipped
        return out

    def _make_refiner(self) -> MetaLearner:
        self.skipped_gp = self.skipped
        lr = self.refine_lr
        return MetaLearner(
            self.loss, lambda ps: torch.optim.Adam(ps, lr=lr), max_bad_steps=self.max_bad_steps
        )

    # -- the OuterOptimizer protocol

    def diagnose(self, problem: Any, batch: Any, hypergrad: Any = None) -> tuple[str, str]:
        if self.refiner is not None:
            return self.refiner.diagnose(problem, batch, hypergrad)
        return "inner", (
            "No tree trained finitely: the inner training diverges whatever the loss; lower "
            "optim.lr or meta.inner_steps."
        )

    def finish(self) -> str | None:
        """No generation with a finite tree is a failure; otherwise the search's best tree is
        a result, refined or not (a refinement that failed or ended on skipped steps is said)."""
        if self.updates == 0:
            raise NonFiniteMetaGradient(
                "no GP generation had a tree with a finite objective: no loss was found. "
                + self.diagnose(None, None)[1],
                "inner",
            )
        if self.refine_stopped and self.refiner is not None:
            return f"GP: {self.refine_stopped}; φ is the last good one"
        if self.refiner is not None and self.refiner.bad_steps:
            return (
                f"the last {self.refiner.bad_steps} refinement step(s) were not finite; φ is the "
                "last good one"
            )
        if self.refiner is None and self.bad_steps:
            return (
                f"the last {self.bad_steps} GP generation(s) had no finite tree; φ is the last "
                "good generation's best"
            )
        return None

    def apply_hyperparameters(self, make: Callable) -> dict[str, tuple[Any, Any]]:
        """Nothing: every GP setting is part of the run's identity (a change is refused)."""
        return {}

    def state_dict(self) -> dict:
        """Tensors and plain values only: the fitness table to replay, the population it must
        reproduce, the loss and the refiner's state."""
        codes, consts = zip(
            *(sym.encode(t, self.max_nodes, self.max_constants) for t in self.population),
            strict=True,
        )
        return copy.deepcopy(
            {
                "kind": STATE_KIND,
                "loss": self.loss.state_dict(),
                "fitness": torch.tensor(self.history, dtype=torch.float64).reshape(
                    len(self.history), self.popsize
                ),
                "population": torch.tensor(codes, dtype=torch.float64),
                "constants": torch.tensor(consts, dtype=torch.float64),
                "refiner": None if self.refiner is None else self.refiner.state_dict(),
                "counters": {
                    "skipped": self.skipped,
                    "diverged": self.diverged,
                    "bad_steps": self.bad_steps,
                },
                "refine_stopped": self.refine_stopped,
            }
        )

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise ValueError(
                f"the checkpoint's meta-learner state is not a GP state ({STATE_KIND}); it was "
                "made with another meta_optim"
            )
        fitness = state["fitness"].double()
        if fitness.ndim != 2 or (len(fitness) and fitness.shape[1] != self.popsize):
            raise ValueError(
                f"GP fitness table of shape {tuple(fitness.shape)} does not fit popsize "
                f"{self.popsize}"
            )
        self.history, self.table, self.refiner, self.refine_stopped = [], [], None, ""
        self.skipped = self.bad_steps = self.updates = self.diverged = self.generation = 0
        self._init_population()
        for row in fitness.numpy():
            self._tell(row, None, None)
        saved = [
            sym.decode(sym.structure(c), k.tolist())
            for c, k in zip(state["population"], state["constants"], strict=True)
        ]
        if saved != self.population:
            raise ValueError(
                f"replaying {len(fitness)} GP generations did not reproduce the checkpointed "
                "population (another metaloss version?); refusing to continue on a different run"
            )
        self.loss.load_state_dict(state["loss"])
        if state.get("refiner") is not None:
            self.refiner = self._make_refiner()
            self.refiner.load_state_dict(state["refiner"])
        counters = state.get("counters") or {}
        self.skipped = int(counters.get("skipped", 0))
        self.diverged = int(counters.get("diverged", 0))
        self.bad_steps = int(counters.get("bad_steps", 0))
        self.refine_stopped = str(state.get("refine_stopped") or "")
