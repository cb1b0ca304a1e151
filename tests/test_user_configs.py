"""User configs through `hydra.searchpath` work wherever built-in ones do, and
docs/extending.md's recipes (a loss, a task, a hypergradient method) work as written, from
outside the package: module and YAML in a directory of the user's, that directory on
sys.path and on `hydra.searchpath`, then the real app's `run(...)`."""

from __future__ import annotations

import functools
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from metaloss import config, kinds
from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.losses.io import load_learned_loss
from metaloss.outer import build_outer
from metaloss.validate import ConfigError, check_config, problems

TINY_META = [
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
TINY_TRAIN = ["logger=none", "progress=false", "train.steps=30", "train.eval_every=10"]


def _compose(config_name: str, overrides: list[str], *, hydra_node: bool = False):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config.conf_dir()), version_base="1.3"):
            return compose(
                config_name=config_name, overrides=overrides, return_hydra_config=hydra_node
            )
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def app_cfg():
    """Compose as the apps receive their config: Hydra's node goes to HydraConfig (where the
    run's searchpath lives) and is removed from the config, as Hydra's run_job does."""

    def _app_cfg(config_name: str, overrides: list[str]):
        cfg = _compose(config_name, overrides, hydra_node=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield _app_cfg
    HydraConfig.instance().cfg = None  # never leak this test's search path into other tests


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text).lstrip())


# ------------------------------------------------------------- the mechanism


def test_config_sources_follow_hydras_search_path_and_precedence(tmp_path, monkeypatch):
    """group_options / load_option see conf/ plus every hydra.searchpath entry (file:// and
    pkg://), and pick the same config Hydra composes for `<group>=<name>`."""
    _write(
        tmp_path,
        {
            "a/loss/user_mse.yaml": "_target_: metaloss.losses.fixed.mae\n_partial_: true\n",
            # shadowed by conf/
            "a/loss/mse.yaml": "_target_: metaloss.losses.fixed.mae\n_partial_: true\n",
            "a/loss/both.yaml": "_target_: metaloss.losses.fixed.mae\n_partial_: true\n",
            # a is earlier
            "b/loss/both.yaml": "_target_: metaloss.losses.fixed.huber\n_partial_: true\n",
            # own defaults list
            "a/loss/heavy_focal.yaml": "defaults:\n  - focal\n  - _self_\ngamma: 5.0\n",
            "userpkg/__init__.py": "",
            "userpkg/conf/__init__.py": "",
            "userpkg/conf/loss/pkg_loss.yaml": (
                "_target_: metaloss.losses.fixed.log_cosh\n_partial_: true\n"
            ),
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sp = f"hydra.searchpath=[file://{tmp_path / 'a'},file://{tmp_path / 'b'},pkg://userpkg.conf]"
    cfg = _compose("meta", [sp], hydra_node=True)
    assert config.searchpath(cfg)[-1] == "pkg://userpkg.conf"
    options = config.group_options("loss", cfg)
    assert {"user_mse", "both", "heavy_focal", "pkg_loss", "mse", "ml3"} <= set(options)
    assert "user_mse" not in config.group_options("loss")  # not without the search path
    for name in ("user_mse", "mse", "both", "heavy_focal", "pkg_loss"):
        hydra_says = _compose("meta", [sp, f"loss={name}"]).loss
        assert OmegaConf.to_container(
            config.load_option("loss", name, cfg)
        ) == OmegaConf.to_container(hydra_says), name
    assert config.load_option("loss", "mse", cfg)._target_ == "metaloss.losses.fixed.mse"
    assert config.load_option("loss", "heavy_focal", cfg).gamma == 5.0
    with pytest.raises(config.UnknownOption, match="unknown loss 'nope'.*user_mse"):
        config.load_option("loss", "nope", cfg)
    # the validation of a config composed with its Hydra node reads that node's search path
    check_config(
        _compose(
            "meta", [sp, "compare=[user_mse,pkg_loss]", "meta.objective=both"], hydra_node=True
        )
    )


def test_a_user_loss_is_accepted_in_compare_and_meta_objective(app_cfg, tmp_path, monkeypatch):
    """`compare:` and `meta.objective` name user losses like built-in ones: validated, used as
    the outer objective, trained and reported in the meta-test."""
    _write(
        tmp_path,
        {
            **_doc_files("user_fixed.py", "my_conf/loss/trimmed_mse.yaml"),
            "counting.py": """
            from metaloss.losses.base import fits

            CALLS = {"objective": 0}


            @fits("regression")
            def counted_mse(pred, target, **_):
                CALLS["objective"] += 1
                return ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(-1)
        """,
            "my_conf/loss/counted_mse.yaml": "_target_: counting.counted_mse\n_partial_: true\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    bad = app_cfg("meta", TINY_META + [search, "compare=[mse,trimmed_mse,nope]"])
    with pytest.raises(
        ConfigError, match=r"compare = .*losses from conf/loss or a loss/ folder.*trimmed_mse"
    ):
        check_config(bad)

    cfg = app_cfg(
        "meta", TINY_META + [search, "compare=[mse,trimmed_mse]", "meta.objective=counted_mse"]
    )
    assert problems(cfg) == []
    out_dir = tmp_path / "run"
    out = meta_app.run(cfg, out_dir, "ml3")
    import counting

    assert counting.CALLS["objective"] > 0  # the outer objective is the user's loss
    comp = json.loads((out_dir / "comparison.json").read_text())
    assert set(comp["results"]) == {"learned", "mse", "trimmed_mse"}
    assert all(len(v) == 2 for v in comp["results"]["trimmed_mse"].values())
    assert out["significance"]["best_baseline"] in {"mse", "trimmed_mse"}


def test_the_parametric_loss_list_comes_from_the_catalogue(app_cfg, tmp_path, monkeypatch):
    """metaloss-meta's "needs a parametric loss" error lists the catalogue's parametric
    losses (a user's among them), and the guide's table (docs/meta.md) names exactly the
    shipped ones."""
    shipped = config.parametric_losses()
    assert (
        {"ml3", "taylorglo", "poly_n"} <= set(shipped)
        and "mse" not in shipped
        and "learned" not in shipped
    )
    guide = (Path(__file__).resolve().parents[1] / "docs" / "meta.md").read_text()
    row = next(line for line in guide.splitlines() if line.startswith("| `loss` (parametric)"))
    assert set(re.findall(r"`(\w+)`", row.split("|")[2])) == set(shipped)

    _write(
        tmp_path,
        {
            "user_param.py": """
            import torch
            from metaloss.losses.base import ParametricLoss


            class WeightedMSE(ParametricLoss):
                kinds = ("regression",)

                def __init__(self):
                    super().__init__()
                    self.log_w = torch.nn.Parameter(torch.zeros(()))

                def forward(self, pred, target, **context):
                    return self.log_w.exp() * ((pred - target) ** 2).reshape("""
            """pred.shape[0], -1).mean(-1)
        """,
            "my_conf/loss/weighted_mse.yaml": "_target_: user_param.WeightedMSE\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [o for o in TINY_META if not o.startswith("loss.")]
    cfg = app_cfg(
        "meta", overrides + [f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "loss=mse"]
    )
    assert "weighted_mse" in config.parametric_losses(cfg)
    with pytest.raises(ValueError, match="needs a parametric loss") as err:
        meta_app.run(cfg, tmp_path / "run", "mse")
    listed = str(err.value).split("choose one of ")[1].split(" (")[0].split(", ")
    assert set(listed) == set(shipped) | {"weighted_mse"}


# ------------------------------------------------------------- docs/extending.md, as written

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _from_doc(name: str, doc: Path | None = None) -> str:
    """The fenced block of docs/extending.md (or ``doc``) that starts with the comment
    ``# <name>``: the tests write the documented files verbatim, so the doc cannot drift from
    what is tested."""
    doc = doc or DOC
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", doc.read_text(), flags=re.S)
    found = [b for b in blocks if b.split("\n", 1)[0].split()[1:2] == [name]]
    assert len(found) == 1, f"{doc.name} has {len(found)} blocks for {name}"
    return found[0]


def _doc_files(*names: str, doc: Path | None = None) -> dict[str, str]:
    return {n: _from_doc(n, doc) for n in names}


def test_a_user_embedding_loss_is_one_function_and_one_yaml(app_cfg, tmp_path, monkeypatch):
    """docs/metric.md's recipe as written: a pair loss from outside the package trains an
    embedding task and is compared with the built-in pair losses."""
    _write(
        tmp_path,
        _doc_files(
            "my_metric_losses.py",
            "my_conf/loss/cosine_margin.yaml",
            doc=DOC.with_name("metric.md"),
        ),
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny_task = ["task=embedding_mnist1d", "task.classes=[8,4,4]", "task.per_class=10"]
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    cfg = app_cfg("train", TINY_TRAIN + [search, *tiny_task, "loss=cosine_margin"])
    train_app.run(cfg, tmp_path / "run", "cosine_margin")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["test/recall_at_1"] <= 1
    assert "cosine_margin" in config.losses_for("embedding", cfg)


TASK_FILES = ("my_tasks.py", "my_conf/task/blobs.yaml", "my_conf/task/waves.yaml")


def test_a_task_defined_outside_the_package_trains_with_noise_and_imbalance(
    app_cfg, tmp_path, monkeypatch
):
    _write(tmp_path, _doc_files(*TASK_FILES))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = app_cfg(
        "train",
        TINY_TRAIN
        + [
            f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
            "task=blobs",
            "task.label_noise.rate=0.2",
            "task.label_noise.kind=pair",
            "task.imbalance_ratio=4",
            "loss=focal",
        ],
    )
    task = instantiate(cfg.task)
    counts = task.class_counts
    assert task.info["imbalance_ratio"] == 4.0 and task.info["label_noise"]["kind"] == "pair"
    assert counts.max() / counts.min() > 2  # the training split is long-tailed
    assert (
        len(task.y_test) == 120 and torch.bincount(task.y_test).min() >= 30
    )  # the test split is not
    value = train_app.run(cfg, tmp_path / "run", "focal")
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (
        rec["task"] == "blobs"
        and rec["metric"] == "test/acc"
        and rec["metrics"]["test/acc"] == pytest.approx(value)
    )
    with pytest.raises(
        ConfigError, match="task.label_noise.rate = 1.5"
    ):  # the shared task rules apply
        check_config(
            app_cfg(
                "train",
                TINY_TRAIN
                + [
                    f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
                    "task=blobs",
                    "task.label_noise.rate=1.5",
                ],
            )
        )


def test_a_task_family_defined_outside_the_package_meta_trains_and_meta_tests(
    app_cfg, tmp_path, monkeypatch
):
    _write(tmp_path, _doc_files(*TASK_FILES))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = app_cfg(
        "meta",
        TINY_META
        + [
            f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
            "task=waves",
            "meta.train_tasks=3",
            "+meta_test.task_overrides.amplitude=[2.0,3.0]",
        ],
    )
    out = meta_app.run(cfg, tmp_path / "run", "ml3")
    comp = json.loads((tmp_path / "run" / "comparison.json").read_text())
    assert comp["task"] == "waves" and set(comp["results"]) == {"learned", "mse", "mae", "huber"}
    assert all(len(v) == 2 for v in comp["results"]["learned"].values())
    assert out["significance"]["metric"] == "test/mse"
    fresh = [instantiate(cfg.task, seed=s).info["amplitude"] for s in (0, 1, 2)]
    assert len(set(fresh)) == 3  # distribution=True: another seed, another task of the family


ORDINAL_FILES = (
    "my_ordinal.py",
    "my_conf/task/ratings.yaml",
    "my_conf/loss/ordinal_ce.yaml",
    "my_conf/loss/expected_distance.yaml",
    "my_conf/loss/ordinal_mix.yaml",
)


@pytest.fixture
def registry_restored():
    """The kinds registry as it was after the test (a test's kind, and its module, go)."""
    known, directions = dict(kinds.KINDS), dict(kinds.HIGHER_IS_BETTER)
    yield
    kinds.KINDS.clear()
    kinds.KINDS.update(known)
    kinds.HIGHER_IS_BETTER.clear()
    kinds.HIGHER_IS_BETTER.update(directions)
    sys.modules.pop("my_ordinal", None)


def test_a_task_kind_defined_outside_the_package_trains_meta_trains_and_is_scored_by_its_metrics(
    app_cfg, tmp_path, monkeypatch, registry_restored
):
    _write(tmp_path, _doc_files(*ORDINAL_FILES))
    monkeypatch.syspath_prepend(str(tmp_path))
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    value = train_app.run(app_cfg("train", TINY_TRAIN + [search, "task=ratings"]), tmp_path / "t")
    rec = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert rec["loss"] == "ordinal_ce" and rec["metric"] == "test/mae"  # the kind's defaults
    assert set(rec["metrics"]) == {"train/loss", "val/acc", "val/mae", "test/acc", "test/mae"}
    assert rec["metrics"]["test/mae"] == pytest.approx(value) and value < 1.5
    tiny = [o for o in TINY_META if not o.startswith("loss.")]  # ML3's sizes
    meta = [*tiny, search, "task=ratings", "loss=ordinal_mix"]
    out = meta_app.run(app_cfg("meta", meta), tmp_path / "m", "ordinal_mix")
    comp = json.loads((tmp_path / "m" / "comparison.json").read_text())
    assert set(comp["results"]) == {"learned", "ordinal_ce", "expected_distance"}
    assert comp["metric"] == "test/mae" and out["significance"]["metric"] == "test/mae"
    assert kinds.HIGHER_IS_BETTER["mae"] is False  # the verdict's direction: lower is better
    with pytest.raises(ValueError, match="labels must lie in"):  # the kind checks its targets
        kinds.get("ordinal").check_targets(
            instantiate(app_cfg("train", TINY_TRAIN + [search, "task=ratings"]).task),
            "train",
            torch.tensor([0, 7]),
        )


def _meta_with_doc_files(tmp_path, monkeypatch, files, overrides: list[str]) -> list[str]:
    """The documented files written to ``tmp_path`` and importable; metaloss-meta overrides
    that find their configs and checkpoint every outer step."""
    _write(tmp_path, _doc_files(*files))
    monkeypatch.syspath_prepend(str(tmp_path))
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    return [*TINY_META, search, *overrides, "meta.checkpoint_every=1"]


def test_a_hypergradient_method_defined_outside_the_package_meta_trains_and_resumes_exactly(
    app_cfg, tmp_path, monkeypatch
):
    files = ("my_hypergrad.py", "my_conf/hypergrad/spsa.yaml")
    base = _meta_with_doc_files(tmp_path, monkeypatch, files, ["hypergrad=spsa"])
    base.append("meta_test.enabled=false")
    whole = tmp_path / "whole"
    meta_app.run(app_cfg("meta", base), whole, "ml3")
    ckpt = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["hypergrad"] == {"calls": 4}
    split = tmp_path / "split"
    meta_app.run(app_cfg("meta", base + ["meta.steps=2"]), split, "ml3")
    halfway = load_learned_loss(split / "learned_loss.pt").state_dict()
    meta_app.run(app_cfg("meta", base), split, "ml3")  # continues from split/checkpoint.pt
    a = load_learned_loss(whole / "learned_loss.pt").state_dict()
    b = load_learned_loss(split / "learned_loss.pt").state_dict()
    assert any(not torch.equal(halfway[k], b[k]) for k in b)  # SPSA moved φ
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical resume


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
def test_an_outer_optimizer_defined_outside_the_package_meta_trains_and_resumes_exactly(
    app_cfg, tmp_path, monkeypatch
):
    files = ("my_outer.py", "my_conf/meta_optim/random_search.yaml")
    chosen = ["meta_optim=random_search", "meta_optim.sigma=0.05"]
    base = _meta_with_doc_files(tmp_path, monkeypatch, files, chosen)
    whole = tmp_path / "whole"
    out = meta_app.run(app_cfg("meta", base), whole, "ml3")
    assert json.loads((whole / "comparison.json").read_text())["results"]["learned"]  # tested
    assert out["skipped_steps"] == 0
    still = tmp_path / "still"  # sigma = 0: every trial is φ itself, so φ stays at its start
    meta_app.run(
        app_cfg("meta", base + ["meta_optim.sigma=0", "meta_test.enabled=false"]), still, "ml3"
    )
    start = load_learned_loss(still / "learned_loss.pt").state_dict()
    a = load_learned_loss(whole / "learned_loss.pt").state_dict()
    assert any(not torch.equal(start[k], a[k]) for k in a)  # the search moved φ
    split = tmp_path / "split"
    meta_app.run(app_cfg("meta", base + ["meta.steps=2", "meta_test.enabled=false"]), split, "ml3")
    meta_app.run(app_cfg("meta", base + ["meta_test.enabled=false"]), split, "ml3")
    b = load_learned_loss(split / "learned_loss.pt").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical resume
    with pytest.raises(TypeError, match="not an outer optimizer"):  # the protocol is checked
        build_outer(functools.partial(_NotAnOuter.for_run), None, None, "regression", 1, dict)


class _NotAnOuter:
    @classmethod
    def for_run(cls, make, loss, cfg, task_kind, world_size):
        return object()


@pytest.mark.slow  # an end-to-end run (the fast suite stays under 10 min)
@pytest.mark.parametrize(
    "app,extra", [("tune", []), ("eval", ["loss_path=x"]), ("meta", ["debug=default"])]
)
def test_run_directories_are_named_by_the_app_not_the_config_file(tmp_path, app, extra):
    """tune and eval extend meta.yaml; a user's own primary config (--config-name) must not move
    the runs out of outputs/<app>/ where metaloss-report and the docs look for them."""
    import subprocess
    import sys
    from pathlib import Path

    from metaloss.config import conf_dir

    (tmp_path / "mine.yaml").write_text(f"defaults:\n  - {app}\n  - _self_\n")
    bin_ = Path(sys.executable).parent / f"metaloss-{app}"
    for flags in ([], ["--config-dir", str(tmp_path), "--config-name", "mine"]):
        out = subprocess.run(
            [
                str(bin_),
                "--cfg",
                "hydra",
                "--resolve",
                *flags,
                *extra,
                f"hydra.searchpath=[file://{conf_dir()}]",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        want = f"outputs/debug/{app}/" if "debug=default" in extra else f"outputs/{app}/"
        assert f"dir: {want}" in out.stdout, out.stdout[:1500]
