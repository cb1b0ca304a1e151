"""metaloss-meta / metaloss-eval end to end, with real Hydra composition and offline W&B."""

import json
import textwrap

import pytest
import torch
from hydra.utils import instantiate

from metaloss.checkpoint import CorruptCheckpoint
from metaloss.cli import eval as eval_app
from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.hypergrad.base import HyperGrad
from metaloss.losses.io import load_learned_loss
from metaloss.losses.poly import PolyN
from metaloss.meta import MetaLearner, NonFiniteMetaGradient
from metaloss.validate import ConfigError
from metaloss.wandb_offline import read_run

TINY = [
    "logger=none",
    "progress=false",
    "meta.steps=4",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "meta_test.seeds=2",
    "meta_test.steps=10",
    "meta_test.tasks_per_seed=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta.plot_every=2",
    "meta.checkpoint_every=2",
]


def test_meta_run_writes_everything_and_logs_to_wandb(compose_cfg, tmp_path):
    cfg = compose_cfg("meta", [o for o in TINY if o != "logger=none"])
    assert cfg.logger.mode == "offline"
    out = meta_app.run(cfg, tmp_path, "ml3")
    comp = json.loads((tmp_path / "comparison.json").read_text())
    assert set(comp["results"]) == {"learned", "mse", "mae", "huber"}
    assert all(len(v) == 2 for v in comp["results"]["learned"].values())  # per-seed lists
    assert comp["significance"]["best_baseline"] in {"mse", "mae", "huber"}
    assert 0 <= comp["significance"]["p_value"] <= 1
    for f in (
        "learned_loss.pt",
        "checkpoint.pt",
        "learned_loss.png",
        "comparison.png",
        "comparison.md",
    ):
        assert (tmp_path / f).stat().st_size > 0, f
    run = read_run(tmp_path / "wandb")
    assert run["finished"]
    objectives = [r["meta/val_objective"] for r in run["history"] if "meta/val_objective" in r]
    assert len(objectives) == 4 and all(v > 0 for v in objectives)
    pictures = [r for r in run["history"] if r.get("meta/learned_loss/_type") == "image-file"]
    assert [r["_step"] for r in pictures] == [2, 4]  # the learned-loss picture as it evolves
    assert "meta_test/learned/test/mse" in run["summary"]
    assert out["significance"] == comp["significance"]


def test_meta_training_changes_phi_and_saved_loss_trains_a_model(compose_cfg, tmp_path):
    cfg = compose_cfg("meta", TINY + ["meta_test.enabled=false"])
    before = instantiate(cfg.loss).state_dict()  # same init seed as the run
    meta_app.run(cfg, tmp_path, "ml3")
    learned = load_learned_loss(tmp_path / "learned_loss.pt")
    assert learned.meta["steps"] == 4
    assert any(not torch.equal(before[k], v) for k, v in learned.state_dict().items())
    tcfg = compose_cfg(
        "train",
        [
            "task=sine",
            "loss=learned",
            f"loss.path={tmp_path / 'learned_loss.pt'}",
            "logger=none",
            "progress=false",
            "train.steps=20",
            "optim=sgd",
            "optim.lr=0.001",
        ],
    )
    (tmp_path / "t").mkdir()
    mse = train_app.run(tcfg, tmp_path / "t", "learned")
    assert 0 < mse < float("inf")


def test_resume_equals_uninterrupted(compose_cfg, tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    meta_app.run(
        compose_cfg("meta", TINY + ["meta_test.enabled=false", "meta.steps=4"]), straight, "ml3"
    )
    part = tmp_path / "part"
    part.mkdir()
    meta_app.run(
        compose_cfg("meta", TINY + ["meta_test.enabled=false", "meta.steps=2"]), part, "ml3"
    )
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    meta_app.run(
        compose_cfg(
            "meta", TINY + ["meta_test.enabled=false", "meta.steps=4", f"meta.resume_from={part}"]
        ),
        resumed,
        "ml3",
    )
    a = load_learned_loss(straight / "learned_loss.pt").state_dict()
    b = load_learned_loss(resumed / "learned_loss.pt").state_dict()
    c = load_learned_loss(part / "learned_loss.pt").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_corrupt_checkpoint_is_a_clear_error(compose_cfg, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CorruptCheckpoint, match="cannot read checkpoint"):
        meta_app.run(compose_cfg("meta", TINY + ["meta_test.enabled=false"]), tmp_path, "ml3")
    with pytest.raises(ConfigError, match="meta.resume_from = .*nope.*existing file"):
        meta_app.run(
            compose_cfg("meta", TINY + [f"meta.resume_from={tmp_path / 'nope'}"]),
            tmp_path / "x",
            "ml3",
        )


def test_a_checkpoint_that_unpacks_to_more_than_it_holds_is_refused_before_loading(
    compose_cfg, tmp_path
):
    """torch.save stores its entries uncompressed: a 200 KB file declaring 200 MB (deflated
    zeros) is a decompression bomb, refused from its zip directory before torch.load runs."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "checkpoint.pt", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"x")
        z.writestr("archive/data/0", bytes(200 * 2**20))
    with pytest.raises(CorruptCheckpoint, match="unpack to 209,715,201 bytes from .* uncompressed"):
        meta_app.run(compose_cfg("meta", TINY + ["meta_test.enabled=false"]), tmp_path, "ml3")


def test_fixed_loss_or_unfit_loss_is_refused(compose_cfg, tmp_path):
    with pytest.raises(ValueError, match="needs a parametric loss"):
        meta_app.run(compose_cfg("meta", TINY[:3] + ["loss=mse"]), tmp_path, "mse")
    with pytest.raises(ValueError, match="Losses for regression"):
        meta_app.run(
            compose_cfg("meta", TINY[:3] + ["task=outliers", "loss=logit_adjusted"]),
            tmp_path,
            "logit_adjusted",
        )


def test_non_finite_hypergradients_are_skipped_then_refused():
    loss = PolyN(degree=2)
    learner = MetaLearner(loss, lambda p: torch.optim.SGD(p, lr=0.1), max_bad_steps=3)
    before = {k: v.clone() for k, v in loss.state_dict().items()}

    def nan_hypergrad(problem, meta, batch):
        return HyperGrad(
            torch.tensor(float("nan")),
            {k: torch.full_like(v, float("nan")) for k, v in meta.items()},
        )

    for _ in range(2):
        metrics = learner.step(None, nan_hypergrad, None)
        assert metrics["meta/skipped"] >= 1
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())  # φ untouched
    with pytest.raises(NonFiniteMetaGradient, match="consecutive"):
        learner.step(None, nan_hypergrad, None)


@pytest.mark.parametrize(
    "extra",
    [
        ["meta.mode=online", "meta.steps=6", "meta.online_update_every=2", "meta.inner_batch=16"],
        ["hypergrad=truncated", "hypergrad.k=1", "meta.learn_inner_lr=true"],
        ["hypergrad=higher", "meta.tasks_per_step=1"],
        ["hypergrad=es", "hypergrad.population=2", "meta_optim.lr=0.05"],
    ],
)
def test_modes_and_methods_run(compose_cfg, tmp_path, extra):
    cfg = compose_cfg("meta", TINY + ["meta_test.enabled=false"] + extra)
    before = instantiate(cfg.loss).state_dict()
    meta_app.run(cfg, tmp_path, "ml3")
    after = load_learned_loss(tmp_path / "learned_loss.pt").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_classification_meta_run_with_taylorglo(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "meta",
        [
            "logger=none",
            "progress=false",
            "task=digits",
            "loss=taylorglo",
            "model.hidden=[16]",
            "meta.steps=3",
            "meta.tasks_per_step=2",
            "meta.inner_steps=3",
            "meta.inner_batch=32",
            "meta.val_batch=64",
            "optim.lr=0.5",
            "compare=[ce,focal]",
            "meta_test.seeds=2",
            "meta_test.steps=20",
            "meta_test.batch_size=32",
        ],
    )
    meta_app.run(cfg, tmp_path, "taylorglo")
    comp = json.loads((tmp_path / "comparison.json").read_text())
    assert comp["metric"] == "test/acc" and set(comp["results"]) == {"learned", "ce", "focal"}
    ecfg = compose_cfg(
        "eval",
        [
            "logger=none",
            "progress=false",
            "task=digits",
            "model.hidden=[16]",
            f"loss_path={tmp_path / 'learned_loss.pt'}",
            "compare=[ce]",
            "meta_test.seeds=2",
            "meta_test.steps=20",
            "optim.lr=0.5",
        ],
    )
    (tmp_path / "eval").mkdir()
    out = eval_app.run(ecfg, tmp_path / "eval")
    assert set(out["results"]) == {"learned", "ce"}
    assert (tmp_path / "eval" / "comparison.json").is_file()


def test_a_loss_defined_outside_the_package_meta_trains_via_target(
    compose_cfg, tmp_path, monkeypatch
):
    """docs/extending.md in action: one module + one YAML, engine untouched."""
    (tmp_path / "my_losses.py").write_text(
        textwrap.dedent('''
        import torch
        from metaloss.losses.base import ParametricLoss

        class ScaledLogCosh(ParametricLoss):
            """log cosh(s r) / s with a learned scale s = exp(log_s)."""
            kinds = ("regression",)

            def __init__(self, init_log_scale: float = 0.0):
                super().__init__(init_log_scale=init_log_scale)
                self.log_s = torch.nn.Parameter(torch.tensor(init_log_scale))

            def forward(self, pred, target, **context):
                s = self.log_s.exp()
                r = (pred - target).reshape(pred.shape[0], -1) * s
                return (torch.logaddexp(r, -r) - torch.log(torch.tensor(2.0))).mean(-1) / s
    ''')
    )
    conf = tmp_path / "conf" / "loss"
    conf.mkdir(parents=True)
    (conf / "scaled_log_cosh.yaml").write_text(
        "_target_: my_losses.ScaledLogCosh\ninit_log_scale: 0.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [o for o in TINY if not o.startswith("loss.")]
    cfg = compose_cfg(
        "meta",
        overrides
        + [
            "meta_test.enabled=false",
            "loss=scaled_log_cosh",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        ],
    )
    meta_app.run(cfg, tmp_path, "scaled_log_cosh")
    learned = load_learned_loss(tmp_path / "learned_loss.pt", trusted_modules=["my_losses"])
    assert type(learned).__name__ == "ScaledLogCosh" and learned.log_s.item() != 0.0


def test_interrupted_run_keeps_its_work(compose_cfg, tmp_path, monkeypatch):
    """A failure mid-run (here: the hypergradient raises at outer step 3) still leaves a
    checkpoint of the completed steps, from which the run resumes."""
    from metaloss.hypergrad.unrolled import Unrolled

    calls = {"n": 0}
    real = Unrolled.__call__

    def flaky(self, problem, meta, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, problem, meta, batch)

    monkeypatch.setattr(Unrolled, "__call__", flaky)
    cfg = compose_cfg("meta", TINY + ["meta_test.enabled=false", "meta.checkpoint_every=100"])
    with pytest.raises(KeyboardInterrupt):
        meta_app.run(cfg, tmp_path, "ml3")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    monkeypatch.setattr(Unrolled, "__call__", real)
    meta_app.run(cfg, tmp_path, "ml3")  # resumes from ./checkpoint.pt
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4


# ---------------------------------------------------------------- a run whose objective never moves


def test_stalled_is_a_flat_trajectory_only():
    from metaloss.meta import stalled

    assert stalled([2.36, 2.33, 2.35, 2.30, 2.37, 2.34]) == pytest.approx(
        (2.345, 2.355, 6)
    )  # noise only
    assert stalled([2.30, 2.25, 2.10, 1.90, 1.70, 1.60]) is None  # it learns
    assert (
        stalled([2.30, 2.30, 2.40, 2.60, 2.90, 3.00]) is None
    )  # it moves (up: divergence's business)
    assert stalled([2.3026, 2.3031, 2.3019]) is None  # too few steps to tell
    assert stalled([0.0] * 8) is None  # a perfect objective has nothing left to improve
    assert stalled([2.3, float("nan"), 2.3, 2.3, 2.3, 2.3]) == (
        2.3,
        2.3,
        5,
    )  # skipped steps do not count


def test_the_default_digits_run_stalls_at_ln10_and_the_warning_names_the_flat_loss(
    compose_cfg, tmp_path, caplog
):
    """The default digits run (ML3 from a random φ) sat at ln 10 for all 200 outer steps and
    ended without a word. Two causes, both measured: K inner SGD steps at optim.lr move a
    10-class model's CE by well under 1% whatever the loss (CE itself included), and the random
    ML3 loss is nearly flat in the logits. Now the run ends with a warning naming both (and it
    is in the result)."""
    cfg = compose_cfg("meta", TINY + ["task=digits", "meta.steps=6", "meta_test.enabled=false"])
    with caplog.at_level("WARNING", logger="metaloss"):
        out = meta_app.run(cfg, tmp_path, "ml3")
    [note] = out["warnings"]
    assert "did not move the objective" in note and "the inner models do not learn" in note
    assert (
        "ln 10 = 2.3026" in note
        and "too small for ANY loss" in note
        and "optim.lr (now 0.05)" in note
    )
    assert "nearly flat in the predictions" in note and "loss.fit_to=ce" in note
    assert note in caplog.text
    assert (
        tmp_path / "learned_loss.pt"
    ).exists()  # a warning, not a failure: φ is valid, just no better


def test_a_run_that_learns_has_no_stall_warning(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "meta", TINY + ["meta.steps=6", "meta_test.enabled=false", "meta_optim.lr=0.05"]
    )
    assert meta_app.run(cfg, tmp_path, "ml3")["warnings"] == []


def test_a_dead_loss_is_reported_even_when_task_noise_hides_the_flat_objective(
    compose_cfg, tmp_path
):
    """ML3 with its output layer scaled by 1e20 is flat (softplus saturated): every
    hypergradient is 0 and φ never changes, but on the sine family the objective jumps between
    tasks (3.2..3.7), so the trajectory alone looks like it moves. It used to end silently."""
    tiny = [
        o for o in TINY if not o.startswith(("loss.hidden", "model.hidden"))
    ]  # at seed 0 this ML3 is dead
    cfg = compose_cfg(
        "meta", tiny + ["loss.init_scale=1e20", "meta.steps=6", "meta_test.enabled=false"]
    )
    [note] = meta_app.run(cfg, tmp_path, "ml3")["warnings"]
    assert "every hypergradient was zero" in note and "nearly flat in the predictions" in note


def test_phi_that_never_changed_is_reported_even_when_task_noise_moves_the_objective():
    from metaloss.meta import check_progress

    phi = {"loss.w": torch.ones(3)}
    noisy = [3.2, 3.7, 3.6, 3.2, 3.7, 3.3]  # a task family: a different task every step

    def sample():
        raise RuntimeError(
            "not needed"
        )  # the explanation is optional; its failure never fails the run

    note = check_progress(noisy, None, phi, sample, initial={"loss.w": torch.ones(3)})
    assert note.startswith("meta-training did not change φ: after 6 outer steps")
    assert check_progress(noisy, None, phi, sample, initial={"loss.w": torch.zeros(3)}) is None
