"""Few-shot learning: episodes, MAML's inner loop with learned losses (ML3-style, MeTAL), its
meta-gradients against a per-episode autograd loop and finite differences, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaloss.cli.fewshot import run
from metaloss.fewshot.losses import MeTAL, PerExample
from metaloss.fewshot.maml import (
    FewShotProblem,
    adapt,
    batched_scores,
    episode_mean_ci,
    hidden_layers,
    initial_meta,
    loop_objective,
    meta_gradient,
)
from metaloss.fewshot.train import MetaTrainingDiverged, meta_train
from metaloss.losses.fixed import ce, mse
from metaloss.losses.mlp import ML3Loss
from metaloss.models import mlp
from metaloss.tasks.episodes import EpisodeBatch, fewshot_mnist1d, sinusoid
from metaloss.wandb_offline import read_run


@pytest.fixture(scope="module")
def episodes():
    return fewshot_mnist1d(way=3, shot=2, query=4, classes=(8, 4, 5), per_class=10)


def _problem(kind: str, loss_name: str, steps: int = 2, first_order: bool = False, **kw):
    torch.manual_seed(0)
    if kind == "classification":
        model = mlp(in_shape=(40,), out_dim=3, hidden=[8, 6])
        out_dim = 3
    else:
        model = mlp(in_shape=(1,), out_dim=1, hidden=[8, 6])
        out_dim = 1
    if loss_name == "fixed":
        loss = PerExample(ce if kind == "classification" else mse, kind=kind)
    elif loss_name == "ml3":
        loss = PerExample(ML3Loss(hidden=(6,)), kind=kind)
    else:
        loss = MeTAL(
            out_dim=out_dim, layers=hidden_layers(model), steps=steps, kind=kind, hidden=5, **kw
        )
    problem = FewShotProblem(model, loss, kind, steps=steps, inner_lr=0.3, first_order=first_order)
    meta = initial_meta(model, loss)
    gen = torch.Generator().manual_seed(1)  # off MeTAL's zero start: every φ gets a gradient
    meta = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in meta.items()}
    return problem, meta


def test_episodes_are_seeded_disjoint_and_relabelled(episodes):
    a = episodes.sample("train", 5, seed=3)
    b = episodes.sample("train", 5, seed=3)
    c = episodes.sample("train", 5, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a.x_support, c.x_support)
    assert a.x_support.shape == (5, 3 * 2, 40) and a.x_query.shape == (5, 3 * 4, 40)
    assert a.y_support[0].tolist() == [0, 0, 1, 1, 2, 2]
    # the three pools hold different classes: no example of one pool appears in another
    pools = episodes.pools
    flat = {s: p.reshape(-1, 40) for s, p in pools.items()}
    assert pools["train"].shape[0] == 8 and pools["val"].shape[0] == 4
    for s, t in (("train", "val"), ("train", "test"), ("val", "test")):
        assert torch.cdist(flat[s], flat[t]).min() > 1e-3
    # an episode's support and query never share an example
    for xs, xq in zip(a.x_support, a.x_query):
        assert torch.cdist(xs, xq).min() > 1e-6
    # the data set itself is the same on every call (offline, from data_seed)
    again = fewshot_mnist1d(way=3, shot=2, query=4, classes=(8, 4, 5), per_class=10)
    assert again.info["sha256"] == episodes.info["sha256"]


def test_episode_settings_are_refused_with_their_range():
    with pytest.raises(ValueError, match=r"episodes.way = 6: the val split has only 4 classes"):
        fewshot_mnist1d(way=6, shot=1, query=2, classes=(8, 4, 5), per_class=10)
    with pytest.raises(ValueError, match=r"shot \+ episodes.query = 12"):
        fewshot_mnist1d(way=2, shot=2, query=10, classes=(8, 4, 5), per_class=10)
    with pytest.raises(ValueError, match="episode split 'dev'"):
        sinusoid().sample("dev", 2, 0)


def test_sinusoid_episodes_follow_maml_ranges():
    b = sinusoid(shot=5, query=7).sample("train", 200, seed=0)
    assert b.x_support.shape == (200, 5, 1) and b.y_query.shape == (200, 7, 1)
    x = torch.cat([b.x_support, b.x_query], 1)
    assert x.min() >= -5 and x.max() <= 5
    amp = torch.cat([b.y_support, b.y_query], 1).abs().amax((1, 2))
    assert amp.max() <= 5.0 and amp.max() > 3.0


@pytest.mark.parametrize("loss_name", ["fixed", "ml3", "metal"])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_meta_gradient_equals_the_per_episode_loop(episodes, loss_name, first_order):
    torch.set_default_dtype(torch.float64)
    problem, meta = _problem("classification", loss_name, first_order=first_order)
    meta = {k: v.double() for k, v in meta.items()}
    problem.model.double(), problem.loss.double()
    batch = episodes.sample("train", 3, seed=0).to("cpu", torch.float64)
    grads, value, _ = meta_gradient(problem, meta, batch)
    leaves = {k: v.clone().requires_grad_() for k, v in meta.items()}
    reference = loop_objective(problem, leaves, batch)
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), rel=1e-12)
    for k in meta:
        ref = leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(meta[k])
        torch.testing.assert_close(grads[k], ref, rtol=1e-9, atol=1e-12, msg=k)
    if loss_name != "fixed":  # a learned loss's φ gets a gradient
        assert any(grads[k].abs().sum() > 0 for k in grads if k.startswith("loss/"))


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_metal_meta_gradient_matches_finite_differences(episodes, kind):
    """The oracle: central differences of the mean query loss along a random direction of
    all meta-parameters (θ0 and φ: support and query networks and the adapter)."""
    torch.set_default_dtype(torch.float64)
    problem, meta = _problem(kind, "metal", steps=3)
    meta = {k: v.double() for k, v in meta.items()}
    source = episodes if kind == "classification" else sinusoid(shot=4, query=5)
    batch = source.sample("train", 2, seed=1).to("cpu", torch.float64)
    grads, _, _ = meta_gradient(problem, meta, batch)
    gen = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in meta.items()}
    eps = 1e-6

    def value(sign):
        moved = {k: v + sign * eps * direction[k] for k, v in meta.items()}
        return batched_scores(problem, moved, batch)[0].mean().item()

    numeric = (value(1) - value(-1)) / (2 * eps)
    analytic = sum((grads[k] * direction[k]).sum().item() for k in meta)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    phi_part = sum((grads[k] * direction[k]).sum().item() for k in meta if k.startswith("loss/"))
    assert abs(phi_part) > 1e-8  # the loss's parameters do reach the query loss


def test_metal_starts_exactly_at_maml(episodes):
    """Residual MeTAL at its initial φ adapts exactly as MAML's cross-entropy does."""
    torch.manual_seed(0)
    model = mlp(in_shape=(40,), out_dim=3, hidden=[8, 6])
    metal = MeTAL(out_dim=3, layers=hidden_layers(model), steps=2)
    maml = PerExample(ce)
    batch = episodes.sample("train", 1, seed=0)
    xs, ys, xq, _ = (t[0] for t in batch)
    thetas = []
    for loss in (maml, metal):
        problem = FewShotProblem(model, loss, "classification", steps=2, inner_lr=0.3)
        thetas.append(adapt(problem, initial_meta(model, loss), xs, ys, xq))
    for k in thetas[0]:
        torch.testing.assert_close(thetas[0][k], thetas[1][k], rtol=0, atol=0)


def test_query_labels_never_reach_the_inner_loop(episodes):
    problem, meta = _problem("classification", "metal")
    batch = episodes.sample("train", 2, seed=0)
    shuffled = EpisodeBatch(batch.x_support, batch.y_support, batch.x_query, batch.y_query.flip(1))
    for b in (batch, shuffled):
        theta = adapt(problem, meta, *(t[0] for t in b[:3]))
        if b is batch:
            first = theta
    for k in first:
        assert torch.equal(first[k], theta[k])
    # but the query inputs do (the query network adapts on them) ...
    other = adapt(problem, meta, batch.x_support[0], batch.y_support[0], batch.x_query[1])
    assert any(not torch.equal(first[k], other[k]) for k in first)
    # ... unless it is switched off
    problem, meta = _problem("classification", "metal", query=False)
    a = adapt(problem, meta, batch.x_support[0], batch.y_support[0], batch.x_query[0])
    b = adapt(problem, meta, batch.x_support[0], batch.y_support[0], batch.x_query[1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_meta_training_keeps_the_best_on_meta_validation_and_stops_on_divergence(episodes):
    problem, meta = _problem("classification", "fixed")
    result = meta_train(
        problem,
        episodes,
        meta,
        steps=6,
        meta_batch=2,
        lr=1e-2,
        seed=0,
        val_every=2,
        val_episodes=10,
    )
    assert [s for s, _ in result.val] == [0, 2, 4, 6]
    best = max(result.val, key=lambda sv: sv[1])
    assert result.best_val == best[1] and result.best_step == best[0]
    problem.inner_lr = 1e6  # the inner loop explodes
    with pytest.raises(MetaTrainingDiverged, match="maml.inner_lr"):
        meta_train(
            problem,
            episodes,
            meta,
            steps=2,
            meta_batch=2,
            lr=1e-2,
            seed=0,
            val_every=1,
            val_episodes=4,
        )


def test_mean_ci_is_the_normal_interval():
    values = torch.tensor([0.2, 0.4, 0.6, 0.8])
    mean, half = episode_mean_ci(values)
    assert mean == pytest.approx(0.5)
    assert half == pytest.approx(1.959964 * values.double().std().item() / 2)


TINY = [
    "episodes.classes=[8,4,5]",
    "episodes.per_class=10",
    "episodes.way=3",
    "episodes.shot=1",
    "episodes.query=3",
    "model.hidden=[8]",
    "maml.steps=2",
    "fewshot.meta_steps=4",
    "fewshot.meta_batch=2",
    "fewshot.val_every=2",
    "fewshot.val_episodes=5",
    "fewshot.test_episodes=12",
    "progress=false",
]


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
@pytest.mark.parametrize("loss", ["ce", "ml3", "metal", "metal_noquery"])
def test_fewshot_app_runs_each_ablation_row(compose_cfg, tmp_path, loss):
    cfg = compose_cfg("fewshot", [*TINY, f"fewshot_loss={loss}", "logger=none"])
    out = run(cfg, tmp_path)
    assert out["test_episodes"] == 12 and len(out["per_episode"]) == 12
    assert 0 <= out["mean"] <= 1 and out["ci95"] > 0
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["mean"] == out["mean"]
    meta = torch.load(tmp_path / "meta.pt", weights_only=True)
    assert any(k.startswith("theta0/") for k in meta)
    assert any(k.startswith("loss/") for k in meta) == (loss != "ce")


def test_fewshot_app_logs_to_wandb_offline(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "fewshot", [*TINY, "fewshot_loss=metal", "logger=wandb", "logger.mode=offline"]
    )
    out = run(cfg, tmp_path)
    rec = read_run(tmp_path)
    assert rec["summary"]["test/acc"] == pytest.approx(out["mean"])
    assert [r["meta/val_score"] for r in rec["history"] if "meta/val_score" in r]


def test_sinusoid_regression_runs_and_reports_mse(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "fewshot",
        [
            "episodes=sinusoid",
            "fewshot_loss=metal",
            "maml.inner_lr=0.01",
            "maml.steps=2",
            "model.hidden=[8]",
            "fewshot.meta_steps=3",
            "fewshot.meta_batch=2",
            "fewshot.val_every=3",
            "fewshot.val_episodes=4",
            "fewshot.test_episodes=6",
            "logger=none",
            "progress=false",
        ],
    )
    out = run(cfg, tmp_path)
    assert out["metric"] == "test/mse" and out["mean"] > 0


def _cli(args, tmp_path):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "metaloss.cli.fewshot",
            *args,
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_cli_refuses_bad_settings_before_compute_and_fails_on_divergence(tmp_path):
    bad = _cli([*TINY, "maml.steps=0", "fewshot.meta_batch=-1"], tmp_path)
    assert bad.returncode == 2
    assert "maml.steps = 0" in bad.stderr and "fewshot.meta_batch = -1" in bad.stderr
    assert not (tmp_path / "run" / "result.json").exists()
    wrong = _cli(["episodes=sinusoid", "fewshot_loss=ce", "progress=false"], tmp_path / "b")
    assert wrong.returncode == 2 and "the episodes (sinusoid) are regression" in wrong.stderr
    diverged = _cli([*TINY, "maml.inner_lr=1e30"], tmp_path / "c")
    assert diverged.returncode == 1, diverged.stderr
    assert "maml.inner_lr" in diverged.stderr
    assert not (tmp_path / "c" / "run" / "result.json").exists()
    ok = _cli(TINY, tmp_path / "d")
    assert ok.returncode == 0, ok.stderr
    assert f"results: {tmp_path / 'd' / 'run' / 'result.json'}" in ok.stdout
    assert ok.stdout.strip().splitlines()[-1].startswith("metaloss-fewshot: outputs in ")


@pytest.mark.parametrize("debug", ["default", "fast_dev_run"])
def test_debug_shortens_a_fewshot_run(compose_cfg, tmp_path, debug):
    cfg = compose_cfg("fewshot", [f"debug={debug}", "fewshot_loss=metal", "progress=false"])
    assert cfg.logger.kind == "none" and cfg.fewshot.meta_steps <= 2
    assert compose_cfg("fewshot").fewshot.meta_steps > 100  # without debug= nothing changes
    out = run(cfg, tmp_path)
    assert out["test_episodes"] == cfg.fewshot.test_episodes


def test_fewshot_record_pairs_rows_on_the_same_episodes(compose_cfg, tmp_path):
    """scripts/fewshot_record.py: a hand computation of the paired difference and its test."""
    from metaloss.metatest import paired

    outs = {}
    for loss in ("ce", "metal"):
        cfg = compose_cfg("fewshot", [*TINY, f"fewshot_loss={loss}", "logger=none"])
        outs[loss] = run(cfg, tmp_path / "sweep" / loss, label=loss)
    script = Path(__file__).resolve().parent.parent / "scripts" / "fewshot_record.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "sweep"),
            "--name",
            "t",
            "--out",
            str(tmp_path / "rec"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "rec" / "results.json").read_text())["rows"]
    metal = next(r for r in rows if r["loss"] == "metal")
    a, b = outs["metal"]["per_episode"], outs["ce"]["per_episode"]
    d = [x - y for x, y in zip(a, b)]
    assert metal["difference"] == pytest.approx(sum(d) / len(d))
    assert metal["p_holm"] == pytest.approx(paired(a, b)["p_value"])  # one comparison: Holm = p
    assert "| 3-way 1-shot | `ce` (reference) |" in (tmp_path / "rec" / "results.md").read_text()
    # metaloss-report reads the same runs: one value per meta-test episode
    from metaloss.report import collect, tidy

    groups = collect(tmp_path / "sweep")
    assert [groups[k]["test/acc"] for k in groups if k.endswith("metal")] == [a]
    assert set(tidy(tmp_path / "sweep")["loss"]) == {"ce", "metal"}
    # a directory without results is refused, naming it
    (tmp_path / "empty").mkdir()
    bad = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "empty"),
            "--name",
            "t",
            "--out",
            str(tmp_path / "rec2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "no result.json under" in bad.stderr


@pytest.mark.slow
def test_compiled_meta_gradient_equals_eager(episodes):
    """fewshot.compile=true: the same meta-gradient through torch.compile (~1-2 min to
    compile on 2 cores even at this size)."""
    from metaloss.fewshot.maml import compiled_meta_gradient

    problem, meta = _problem("classification", "metal", steps=1)
    batch = episodes.sample("train", 2, seed=0)
    compiled = compiled_meta_gradient(problem)(meta, batch)
    eager = meta_gradient(problem, meta, batch)
    assert compiled[1].item() == pytest.approx(eager[1].item(), rel=1e-5)
    for k in meta:
        torch.testing.assert_close(compiled[0][k], eager[0][k], rtol=1e-4, atol=1e-6, msg=k)


def test_labels_carry_the_command_lines_loss_settings():
    from metaloss.cli.fewshot import run_label

    assert run_label("ce", ["seed=1", "fewshot_loss.loss=focal"]) == "ce[loss=focal]"
    assert run_label("metal", ["fewshot_loss.residual=false", "+fewshot_loss.hidden=8"]) == (
        "metal[hidden=8,residual=false]"
    )
    assert run_label("metal_noquery", ["episodes.shot=5"]) == "metal_noquery"


def test_validation_episodes_come_from_the_eval_seed(episodes):
    class Recording:
        kind = episodes.kind

        def __init__(self):
            self.asked = []

        def sample(self, split, n, seed):
            self.asked.append((split, seed))
            return episodes.sample(split, n, seed)

    problem, meta = _problem("classification", "fixed")
    for seed, eval_seed in ((0, 0), (1, 0), (0, 5)):
        source = Recording()
        meta_train(
            problem,
            source,
            meta,
            steps=2,
            meta_batch=2,
            lr=1e-3,
            seed=seed,
            val_every=1,
            val_episodes=6,
            eval_seed=eval_seed,
        )
        assert {s for split, s in source.asked if split == "val"} == {eval_seed}
        assert {s for split, s in source.asked if split == "train"} == {
            seed * 1_000_000 + 1,
            seed * 1_000_000 + 2,
        }


def test_an_interrupted_run_saves_the_best_so_far_and_says_so(compose_cfg, tmp_path, monkeypatch):
    import metaloss.cli.fewshot as app

    class Bar:
        def __init__(self, *a, **k):
            self.n = 0

        def update(self, k):
            self.n += k
            if self.n == 3:
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(app, "tqdm", Bar)
    cfg = compose_cfg("fewshot", [*TINY, "fewshot_loss=metal", "logger=none"])
    with pytest.raises(KeyboardInterrupt) as stop:
        run(cfg, tmp_path)
    assert len(stop.value.result.train) == 3
    saved = torch.load(tmp_path / "meta_interrupted.pt", weights_only=True)
    assert set(saved) == set(stop.value.result.meta)
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "meta.pt").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fewshot_loss.loss=class_balanced_focal"], "cannot score an episode's support set"),
        (["+fewshot_loss.bogus=1"], "fewshot_loss.bogus: not a setting"),
        (["fewshot_loss=metal", "+fewshot_loss.bogus=1"], "fewshot_loss.bogus: not a setting"),
        (["fewshot_loss=ml3", "fewshot_loss.loss_params.fit_to=mse"], "fit_to = 'mse'"),
        (["fewshot_loss=ml3", "+fewshot_loss.loss_params.nope=1"], "fewshot_loss.loss = 'ml3'"),
        (["episodes.classes=[8.7,4,5]"], "episodes.classes"),
        (["fewshot.meta_steps=1000000"], "fewshot.meta_steps"),
    ],
)
def test_settings_an_episode_cannot_use_are_refused_before_training(
    compose_cfg, tmp_path, overrides, message
):
    from metaloss.errors import ConfigError

    cfg = compose_cfg("fewshot", [*TINY, "logger=none", *overrides])
    with pytest.raises(ConfigError, match=message):
        run(cfg, tmp_path)
    assert not (tmp_path / "result.json").exists()


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_fewshot_record_refuses_runs_it_cannot_pair_and_tampered_files(compose_cfg, tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "fewshot_record.py"

    def record(where):
        return subprocess.run(
            [sys.executable, str(script), str(where), "--name", "t", "--out", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            timeout=120,
        )

    for loss, extra in (("ce", []), ("metal", ["fewshot.eval_seed=5"])):
        cfg = compose_cfg("fewshot", [*TINY, f"fewshot_loss={loss}", "logger=none", *extra])
        run(cfg, tmp_path / "a" / loss, label=loss)
    out = record(tmp_path / "a")
    assert out.returncode != 0 and "differ in config.fewshot" in out.stderr
    assert not (tmp_path / "o").exists()
    f = tmp_path / "a" / "metal" / "result.json"
    for edit, message in (
        (lambda r: r["per_episode"].__setitem__(0, 5.0), "accuracies must lie in [0, 1]"),
        (lambda r: r.__setitem__("mean", 0.99), "is not the mean of per_episode"),
        (lambda r: r.pop("ci95"), "ci95: missing"),
    ):
        r = json.loads(f.read_text())
        edit(r)
        f.write_text(json.dumps(r))
        out = record(tmp_path / "a")
        assert out.returncode != 0 and message in out.stderr, out.stderr
        run(
            compose_cfg("fewshot", [*TINY, "fewshot_loss=metal", "logger=none"]),
            tmp_path / "b",
            label="metal",
        )  # a clean copy to edit next
        f.write_text((tmp_path / "b" / "result.json").read_text())
        (tmp_path / "b" / "run.json").unlink(missing_ok=True)
        import shutil

        shutil.rmtree(tmp_path / "b")
