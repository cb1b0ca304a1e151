"""Implicit hypergradients: the implicit function theorem at the end of the inner run.

If the inner run ends at a stationary point θ*(φ) of the inner objective J(θ, φ)
(∇θ J = 0), then dθ*/dφ = -H⁻¹ ∂²J/∂θ∂φ with H = ∂²J/∂θ², and

    dM/dφ = ∂M/∂φ - (∂²J/∂φ∂θ) q,        q = H⁻¹ ∂M/∂θ  at θ_K.

The K inner steps run without a graph, so memory does not grow with K; q is found
iteratively from Hessian-vector products (``torch.func.jvp`` of ``torch.func.grad``,
forward-over-reverse, never a full Hessian), all vmapped over the T tasks:

- ``solver: neumann`` — truncated Neumann series H⁻¹ ≈ α Σ_{j<=n} (I - αH)^j
  (Lorraine, Vicol, Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
  Differentiation", AISTATS 2020). Converges when 0 < α < 2/λ_max(H) and H ≻ 0.
- ``solver: cg`` — conjugate gradients on (H + δI) q = ∂M/∂θ (Rajeswaran, Finn, Kakade,
  Levine, "Meta-Learning with Implicit Gradients" (iMAML), NeurIPS 2019). Per task, stops
  on a relative residual ``tolerance``; a direction of non-positive curvature stops that
  task's iteration (damping δ > 0 makes H + δI positive definite on convex-ish problems).

J(θ, φ) is the learned inner loss on the last ``batches`` inner batches (at their own
training progress t = k/K). The result is exact only at an exact stationary point of that J
(full-batch inner training run to convergence); after a short or stochastic inner run it is
an approximation that the unrolled methods do not make. A meta-learned inner learning rate
(``inner.log_lr``, ``meta.learn_inner_lr=true``) is refused: a stationary point does not
depend on it, so its hypergradient would always be zero and the setting silently ignored.

A Neumann series that diverges (some eigenvalue λ of H + δI with α·λ outside (0, 2): its
terms grow instead of shrinking) gives no estimate: q is NaN for that task, so the learner
skips the step, and :meth:`Implicit.diagnosis` says which setting to change (``alpha`` when
α·λ > 2, ``damping`` when the curvature is negative), measured from the growing direction.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jvp, vjp

from metaloss.hypergrad.base import (
    LR_KEY,
    HyperGrad,
    MetaBatch,
    MetaProblem,
    Params,
    detach,
    grad_theta,
    split_meta,
    unroll,
)

SOLVERS = ("neumann", "cg")


def _dot(a: Params, b: Params) -> torch.Tensor:
    """Per-task inner product of two batched trees ``[T, ...]`` -> ``[T]``."""
    return torch.stack([(a[k] * b[k]).flatten(1).sum(1) for k in a]).sum(0)


def _axpy(s: torch.Tensor, x: Params, y: Params) -> Params:
    """y + s x with a per-task scalar s ``[T]``."""
    return {k: y[k] + s.reshape(-1, *[1] * (x[k].ndim - 1)) * x[k] for k in y}


class Implicit:
    """``solver``: neumann | cg; ``iterations``: Neumann terms / CG steps (at most);
    ``alpha``: Neumann step (None: the inner optimizer's learning rate); ``damping``: δ in
    (H + δI); ``tolerance``: stop when every task's ‖residual‖ ≤ tolerance ‖∂M/∂θ‖
    (CG; for Neumann the norm of the last added term); ``batches``: how many of the last
    inner batches define J."""

    def __init__(
        self,
        solver: str = "cg",
        iterations: int = 20,
        alpha: float | None = None,
        damping: float = 0.0,
        tolerance: float = 1e-6,
        batches: int = 1,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"unknown implicit solver {solver!r}; valid: {', '.join(SOLVERS)}")
        if iterations < 1 or batches < 1:
            raise ValueError(
                "implicit hypergradient needs iterations >= 1 and batches >= 1, "
                f"got {iterations}, {batches}"
            )
        if alpha is not None and alpha <= 0:
            raise ValueError(f"implicit alpha must be > 0 (or null), got {alpha}")
        if damping < 0 or tolerance < 0:
            raise ValueError(
                f"implicit damping and tolerance must be >= 0, got {damping}, {tolerance}"
            )
        self.solver, self.iterations, self.alpha = solver, iterations, alpha
        self.damping, self.tolerance, self.batches = damping, tolerance, batches
        self.last_iterations = 0  # how many solver steps the last call took (diagnostics)
        self._failure: tuple[str, str, str] | None = (
            None  # why the last estimate is not finite (see diagnosis)
        )

    def _alpha(self, problem: MetaProblem) -> float:
        if self.alpha is not None:
            return self.alpha
        lr = problem.inner_opt.hparams.get("lr")
        if lr is None:
            raise ValueError(
                "implicit neumann: set hypergrad.alpha (the inner optimizer has no lr)"
            )
        return float(lr)

    def __call__(self, problem: MetaProblem, meta: Params, batch: MetaBatch) -> HyperGrad:
        if LR_KEY in meta:
            raise ValueError(
                "hypergrad=implicit cannot meta-learn the inner learning rate "
                "(meta.learn_inner_lr=true): the end point of a converged inner run does not "
                "depend on it, so its hypergradient is zero. Set meta.learn_inner_lr=false, "
                "or use hypergrad=unrolled / checkpointed / es"
            )
        meta = detach(meta)
        phi, _ = split_meta(meta)
        self._failure = None
        k_steps = problem.inner_steps
        first = max(0, k_steps - self.batches)
        ts = [k / k_steps for k in range(first, k_steps)]
        xj, yj = batch.x_train[:, first:], batch.y_train[:, first:]

        # 1. the inner run, without a graph: memory independent of K
        with torch.no_grad():
            theta = torch.vmap(lambda th, x, y: unroll(problem, meta, th, x, y))(
                detach(batch.theta0), batch.x_train, batch.y_train
            )

        def grad_j(th, ph, x, y):  # ∇θ J(θ, φ) on the last batches of one task
            g = [grad_theta(problem, th, ph, x[i], y[i], t) for i, t in enumerate(ts)]
            return {k: sum(gi[k] for gi in g) / len(g) for k in g[0]}

        def objective(th, x, y):
            pred = functional_call(problem.model, th, (x,))
            return problem.objective(pred, y, **problem.objective_context).mean()

        # 2. v = ∂M_t/∂θ at θ_K per task, and the meta-loss
        v, values = torch.vmap(torch.func.grad_and_value(objective))(
            theta, batch.x_val, batch.y_val
        )

        damping = self.damping

        def hvp(vec: Params) -> Params:  # (H + δI) vec per task, forward-over-reverse
            def one(th, u, x, y):
                return jvp(lambda t: grad_j(t, phi, x, y), (th,), (u,))[1]

            hv = torch.vmap(one)(theta, vec, xj, yj)
            return {k: hv[k] + damping * vec[k] for k in hv} if damping else hv

        # 3. q ≈ (H + δI)⁻¹ v
        q = self._cg(hvp, v) if self.solver == "cg" else self._neumann(hvp, v, self._alpha(problem))

        # 4. dM/dφ = -(∂²J/∂φ∂θ) q, averaged over tasks (M does not depend on φ directly)
        def mixed(th, qt, x, y):
            pull = vjp(lambda ph: grad_j(th, ph, x, y), phi)[1]  # (output, pullback)
            return pull(qt)[0]

        per_task = torch.vmap(mixed, in_dims=(0, 0, 0, 0))(theta, q, xj, yj)
        grads = {"loss." + k: -g.mean(0) for k, g in per_task.items()}
        return HyperGrad(values.mean(), {k: grads[k] for k in meta})

    # how much the last term may exceed the first before the series counts as diverging. For
    # the symmetric H + δI the terms never grow when every 0 < αλ < 2; a slightly negative
    # curvature makes them grow slowly (|1 - αλ| just above 1), and the *truncated* sum is then
    # still a usable, regularised estimate (the default quickstart run with neumann: last term
    # 1.002x the first). Past 2x the sum is dominated by the growing direction.
    GROWTH = 2.0
    BLOWUP = 1e6  # stop early once a term is this many times the first: certainly diverging

    def _neumann(self, hvp, v: Params, alpha: float) -> Params:
        """q = α Σ_{j=0..n} (I - αH)^j v (Lorraine et al. 2020, Algorithm 3).

        For the symmetric H + δI the terms shrink when every eigenvalue λ has 0 < αλ < 2;
        a last term past ``GROWTH`` times the first means some |1 - αλ| > 1 has taken over the
        sum. Such a task's q is NaN (no estimate, the step is skipped) and the cause is
        kept for :meth:`diagnosis`, with λ estimated on the growing term (Rayleigh quotient)."""
        term, acc = v, dict(v)
        ref = _dot(v, v).sqrt()
        sane = torch.isfinite(ref)  # a non-finite ∂M/∂θ is the inner run's failure, not the series'
        curvature = torch.zeros_like(ref)
        for i in range(self.iterations):
            h = hvp(term)
            tt = _dot(term, term)
            curvature = _dot(term, h) / torch.where(tt > 0, tt, torch.ones_like(tt))
            term = {k: term[k] - alpha * h[k] for k in term}
            acc = {k: acc[k] + term[k] for k in acc}
            self.last_iterations = i + 1
            size = _dot(term, term).sqrt()
            if bool((size <= self.tolerance * ref).all()) or bool(
                ((size > self.BLOWUP * ref) & sane).any()
            ):
                break
        size = _dot(term, term).sqrt()
        finite = torch.stack([torch.isfinite(a).flatten(1).all(1) for a in acc.values()]).all(0)
        diverged = sane & ((size > self.GROWTH * ref) | ~finite | ~torch.isfinite(size))
        if bool(diverged.any()):
            growth = torch.where(diverged, size / ref.clamp_min(1e-300), torch.zeros_like(size))
            worst = int(growth.argmax())
            self._failure = self._neumann_advice(
                int(diverged.sum()), len(ref), float(growth[worst]), float(curvature[worst]), alpha
            )
            nan = torch.full_like(ref, float("nan"))
            acc = {
                k: torch.where(
                    diverged.reshape(-1, *[1] * (a.ndim - 1)),
                    nan.reshape(-1, *[1] * (a.ndim - 1)),
                    a,
                )
                for k, a in acc.items()
            }
        return {k: alpha * a for k, a in acc.items()}

    def _neumann_advice(
        self, bad: int, tasks: int, growth: float, lam: float, alpha: float
    ) -> tuple[str, str, str]:
        a_name = (
            f"hypergrad.alpha = {alpha:g}"
            if self.alpha is not None
            else f"hypergrad.alpha = null, i.e. the inner lr {alpha:g}"
        )
        head = (
            f"the Neumann series (hypergrad.solver = neumann) diverged on {bad} of {tasks} "
            f"task(s): its {self.last_iterations}th term is {growth:.3g}x the first "
            "(it converges only if 0 < α·λ < 2 for "
            f"every eigenvalue λ of H + δI; {a_name}, hypergrad.damping = {self.damping:g}). "
        )
        if not (lam == lam) or abs(lam) == float("inf"):
            why = "The series overflowed. "
            fix = "Lower hypergrad.alpha or raise hypergrad.damping"
        elif lam > 0:
            why = (
                f"The growing direction has curvature λ ≈ {lam:.3g}, "
                f"so α·λ ≈ {alpha * lam:.3g} > 2. "
            )
            fix = f"Lower hypergrad.alpha below 2/λ ≈ {2 / lam:.3g}"
        else:
            why = (
                f"The growing direction has curvature λ ≈ {lam:.3g} <= 0: "
                "the learned inner loss is not convex "
                "at the end of the inner run. "
            )
            fix = (
                f"Raise hypergrad.damping above {self.damping - lam:.3g} "
                "(then keep hypergrad.alpha below "
                "2 / (largest curvature + damping))"
            )
        fix += (
            ", or use hypergrad.solver=cg (it stops at non-positive curvature); "
            "changing hypergrad.iterations "
            "does not fix a diverging series."
        )
        return "neumann", (head + why).strip().rstrip("."), fix

    def diagnosis(self) -> tuple[str, str, str] | None:
        """``(cause, finding, fix)`` when the last call gave no estimate because the Neumann
        series diverged (the learner reports it when the inner training itself is finite)."""
        return self._failure

    def _cg(self, hvp, v: Params) -> Params:
        """Conjugate gradients, one independent solve per task run in lockstep (iMAML)."""
        x = {k: torch.zeros_like(t) for k, t in v.items()}
        r, p = dict(v), dict(v)
        rs = _dot(r, r)
        stop = rs.sqrt() * self.tolerance
        active = rs.sqrt() > stop
        for i in range(self.iterations):
            if not bool(active.any()):
                break
            hp = hvp(p)
            curv = _dot(p, hp)
            active = active & (curv > 0)  # non-positive curvature: keep this task's iterate
            step = torch.where(
                active, rs / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rs)
            )
            x = _axpy(step, p, x)
            r = _axpy(-step, hp, r)
            rs_new = _dot(r, r)
            beta = torch.where(
                active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs)
            )
            p = _axpy(beta, p, r)
            rs = torch.where(active, rs_new, rs)
            active = active & (rs.sqrt() > stop)
            self.last_iterations = i + 1
        return x
