"""W&B as researchers use it, checked on real offline runs read back from their files:
seeds of one setting in one group, job types, metric axes, the learned loss as an artifact
and artifact references as loss paths.

What cannot run here: fetching an artifact from a W&B server (no network, no account).
``test_artifact_reference_*`` replace only ``wandb.Api`` -- the network call -- with a fake
that serves the bytes the offline run recorded; everything after it is the real loader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.cli.logger import default_group
from metaloss.losses.io import (
    ARTIFACT_TYPE,
    CorruptLossFile,
    LossArtifactUnavailable,
    UntrustedLossClass,
    load_learned_loss,
)
from metaloss.wandb_offline import artifact_file, read_run

BIN = Path(sys.executable).parent
TRAIN = ["progress=false", "train.steps=5", "train.eval_every=5"]
META = [
    "progress=false",
    "meta.steps=2",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta.plot_every=1",
    "meta_test.seeds=2",
    "meta_test.steps=5",
    "meta_test.tasks_per_seed=1",
]


@pytest.fixture(autouse=True)
def _wandb_dirs(tmp_path_factory, monkeypatch):
    """W&B's staging and cache directories (artifact copies) inside the test's tmp dir."""
    root = tmp_path_factory.mktemp("wandb-home")
    for var, sub in (
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(var, str(root / sub))


# ------------------------------------------------------------------ groups


def test_default_group_from_hydra_overrides():
    def group(overrides, experiment=None):
        return default_group({}, (overrides, {"experiment": experiment, "loss": "mse"}))

    base = ["task=outliers", "loss=mse", "logger=wandb", "progress=false", "logger.mode=offline"]
    assert group(base + ["seed=0"]) == "loss=mse,task=outliers"
    # seeds and replicate seeds never split a group; settings do; order does not matter
    assert (
        group(["seed=1", "task.seed=3", "hypergrad.seed=2", "seeds=4"] + base[::-1])
        == "loss=mse,task=outliers"
    )
    assert group(base + ["loss=mae"]) != group(base)
    assert group(base + ["meta_test.seeds=3"]) != group(base)  # the protocol, not a replicate
    # an experiment names the group; the overrides on top of it follow
    assert group(["experiment=quickstart", "seed=2"], "quickstart") == "quickstart"
    assert (
        group(["+experiment=quickstart", "meta.steps=5", "threads=2"], "quickstart")
        == "quickstart,meta.steps=5"
    )
    long = group([f"task.x{i}={'v' * 20}" for i in range(10)])
    assert len(long) <= 128 and long != group([f"task.x{i}={'v' * 20}" for i in range(9)])


def test_default_group_from_config_without_hydra(compose_cfg):
    def group(overrides):
        return default_group(compose_cfg("train", ["task=outliers"] + overrides))

    g = group(["loss=mse", "seed=0"])
    assert g.startswith("mse-outliers-")
    assert (
        group(["loss=mse", "seed=1", "progress=false", "logger=none"]) == g
    )  # seeds / logging: same group
    assert group(["loss=mae", "seed=0"]) != g
    assert group(["loss=mse", "train.steps=7"]) != g
    # no Hydra runtime for an empty ({}, {}) either: still a name from the config
    assert default_group(compose_cfg("train", ["task=outliers", "loss=mse"]), ([], {})) == g


def test_train_run_records_group_job_type_and_explicit_group_wins(compose_cfg, tmp_path):
    cfg = compose_cfg("train", TRAIN + ["task=outliers", "loss=mse", "model.hidden=[8]"])
    train_app.run(cfg, tmp_path / "a", "mse")
    run = read_run(tmp_path / "a" / "wandb")["run"]
    assert (
        run["job_type"] == "train"
        and run["group"] == default_group(cfg)
        and run["name"] == "mse-s0"
    )
    cfg = compose_cfg(
        "train", TRAIN + ["task=outliers", "loss=mse", "model.hidden=[8]", "logger.group=mine"]
    )
    train_app.run(cfg, tmp_path / "b", "mse")
    assert read_run(tmp_path / "b" / "wandb")["run"]["group"] == "mine"


@pytest.mark.slow
def test_multirun_seeds_share_a_group_and_settings_do_not(tmp_path):
    """The console script as a researcher runs it: `-m seed=0,1 loss=mse,mae`, four jobs."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [
            BIN / "metaloss-train",
            "-m",
            "seed=0,1",
            "loss=mse,mae",
            "task=outliers",
            "model.hidden=[8]",
            *TRAIN,
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {}
    for metrics in sweep.rglob("metrics.json"):
        rec = json.loads(metrics.read_text())
        runs[(rec["loss"], rec["seed"])] = read_run(metrics.parent / "wandb")["run"]
    assert len(runs) == 4 and {r["job_type"] for r in runs.values()} == {"train"}
    common = "model.hidden=[8],task=outliers,train.eval_every=5,train.steps=5"
    assert runs["mse", 0]["group"] == runs["mse", 1]["group"] == f"loss=mse,{common}"
    assert runs["mae", 0]["group"] == runs["mae", 1]["group"] == f"loss=mae,{common}"
    assert len({r["id"] for r in runs.values()}) == 4  # four runs, two groups


# ------------------------------------------------------------------ meta: axes, table, artifact


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    """One tiny metaloss-meta run with offline W&B and a meta-test, shared by the tests below."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metaloss.config import conf_dir

    out = tmp_path_factory.mktemp("meta")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_DATA_DIR", str(out.parent / "meta-wandb-data"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="meta", overrides=META)
    GlobalHydra.instance().clear()
    meta_app.run(cfg, out, "ml3")
    yield out, read_run(out / "wandb")
    mp.undo()


def test_meta_run_job_type_and_metric_axes(meta_run):
    out, run = meta_run
    assert run["finished"] and run["run"]["job_type"] == "meta"
    axes = {m.get("glob_name") or m.get("name"): m.get("step_metric") for m in run["metrics"]}
    assert axes == {"meta/step": None, "meta/*": "meta/step", "meta_test/*": "meta/step"}
    rows = [r for r in run["history"] if "meta/val_objective" in r]
    assert [r["meta/step"] for r in rows] == [1, 2]  # the axis rides in the rows plotted against it


def test_comparison_table_is_a_wandb_table_with_n_nan(meta_run):
    out, run = meta_run
    row = next(r for r in run["history"] if r.get("meta_test/table/_type") == "table-file")
    table = json.loads(
        next((out / "wandb").glob(f"offline-run-*/files/{row['meta_test/table/path']}")).read_text()
    )
    assert table["columns"] == ["loss", "metric", "mean", "std", "n", "n_nan"]
    assert {r[0] for r in table["data"]} == {"learned", "mse", "mae", "huber"}
    assert all(r[4] == 2 and r[5] == 0 for r in table["data"])


def test_learned_loss_is_an_artifact_of_the_offline_run(meta_run):
    out, run = meta_run
    (art,) = [a for a in run["artifacts"] if a["type"] == ARTIFACT_TYPE]
    assert art["type"] == ARTIFACT_TYPE and art["name"] == "learned-loss-ml3-sine"
    assert set(art["aliases"]) == {"latest", f"run-{run['run']['id']}"}
    meta = art["metadata"]
    assert meta["task"] == "sine" and meta["steps"] == 2 and meta["complete"] is True
    assert meta["fingerprint"] == json.loads((out / "run.json").read_text())["fingerprint"]
    assert set(art["files"]) == {"learned_loss.pt", "learned_loss.png"}
    staged = artifact_file(art, "learned_loss.pt")  # what `wandb sync` uploads, digest checked
    assert staged.read_bytes() == (out / "learned_loss.pt").read_bytes()


def test_last_good_loss_is_an_artifact_when_meta_training_diverges(compose_cfg, tmp_path):
    from metaloss.meta import NonFiniteMetaGradient

    cfg = compose_cfg(
        "meta", META + ["optim.lr=1e30", "meta.max_bad_steps=1", "meta_test.enabled=false"]
    )
    with pytest.raises(NonFiniteMetaGradient):
        meta_app.run(cfg, tmp_path, "ml3")
    run = read_run(tmp_path / "wandb")
    (art,) = [a for a in run["artifacts"] if a["type"] == ARTIFACT_TYPE]
    assert art["name"] == "learned-loss-ml3-sine-last-good"  # never the finished loss's :latest
    assert art["metadata"]["complete"] is False and art["metadata"]["stopped"].startswith(
        "diverged"
    )
    assert "learned_loss_last_good.pt" in art["files"]
    assert (
        load_learned_loss(artifact_file(art, "learned_loss_last_good.pt")).meta["complete"] is False
    )


# ------------------------------------------------------------------ artifact references


class _FakeArtifact:
    def __init__(self, art: dict, type_: str | None = None, files: dict[str, Path] | None = None):
        self.type = type_ or art["type"]
        self.metadata = art["metadata"]
        self.files = files or {p: artifact_file(art, p) for p in art["files"]}

    def download(self, root):
        Path(root).mkdir(parents=True, exist_ok=True)
        for name, src in self.files.items():
            shutil.copy(src, Path(root) / name)
        return str(root)


def _fake_api(monkeypatch, artifact: _FakeArtifact) -> list:
    """Replace the network boundary, ``wandb.Api``, by a server that knows one artifact."""
    import wandb

    calls = []

    class FakeApi:
        def __init__(self, *args, **kwargs):
            calls.append(("Api", kwargs))

        def artifact(self, name, type=None):
            calls.append(("artifact", name, type))
            return artifact

    monkeypatch.setattr(wandb, "Api", FakeApi)
    return calls


def test_artifact_reference_loads_through_the_safe_loader(
    meta_run, monkeypatch, compose_cfg, tmp_path
):
    out, run = meta_run
    (art,) = [a for a in run["artifacts"] if a["type"] == ARTIFACT_TYPE]
    ref = f"wandb-artifact://metaloss/{art['name']}:run-{run['run']['id']}"
    calls = _fake_api(monkeypatch, _FakeArtifact(art))
    loss = load_learned_loss(ref)
    assert calls[1] == ("artifact", ref.removeprefix("wandb-artifact://"), ARTIFACT_TYPE)
    local = load_learned_loss(out / "learned_loss.pt")
    assert all(torch.equal(v, local.state_dict()[k]) for k, v in loss.state_dict().items())
    assert loss.meta["source"] == ref and loss.meta["complete"] is True
    # metaloss-train loss=learned loss.path=<reference>: the config's _target_ takes the same path
    tcfg = compose_cfg(
        "train",
        [
            "task=sine",
            "loss=learned",
            f"loss.path={ref}",
            "logger=none",
            "progress=false",
            "train.steps=5",
            "optim=sgd",
            "optim.lr=0.001",
            "model.hidden=[8]",
        ],
    )
    assert 0 < train_app.run(tcfg, tmp_path, "learned") < float("inf")


def test_artifact_reference_gets_no_trust_for_coming_from_wandb(meta_run, monkeypatch, tmp_path):
    out, run = meta_run
    (art,) = [a for a in run["artifacts"] if a["type"] == ARTIFACT_TYPE]
    blob = torch.load(out / "learned_loss.pt", weights_only=True)
    evil = tmp_path / "learned_loss.pt"
    torch.save({**blob, "target": "my_evil_losses.mlp.ML3Loss"}, evil)
    _fake_api(monkeypatch, _FakeArtifact(art, files={"learned_loss.pt": evil}))
    with pytest.raises(UntrustedLossClass, match="trusted_modules"):
        load_learned_loss("wandb-artifact://metaloss/learned-loss-ml3-sine:latest")
    _fake_api(monkeypatch, _FakeArtifact(art, type_="model"))
    with pytest.raises(CorruptLossFile, match="type 'model'"):
        load_learned_loss("wandb-artifact://metaloss/learned-loss-ml3-sine:latest")
    with pytest.raises(ValueError, match="project/name:version"):
        load_learned_loss("wandb-artifact://learned-loss-ml3-sine")


@pytest.mark.slow
def test_artifact_reference_without_credentials_is_a_clear_error(tmp_path):
    """Real W&B, no fake: with no API key the reference fails at once, saying what to do;
    the setting itself is accepted (it is not a missing file)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(
        HOME=str(home),
        WANDB_CONFIG_DIR=str(home / "wandb"),
        NETRC=str(home / "netrc"),
        WANDB_DATA_DIR=str(home / "data"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_SILENT="true",
    )
    proc = subprocess.run(
        [
            BIN / "metaloss-eval",
            "loss_path=wandb-artifact://metaloss/learned-loss-ml3-sine:latest",
            "logger=none",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert "cannot fetch W&B artifact 'metaloss/learned-loss-ml3-sine:latest'" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert "wandb sync" in proc.stderr and "ConfigError" not in proc.stderr


def test_artifact_reference_error_type(monkeypatch):
    import wandb

    class NoServer:
        def __init__(self, *a, **k):
            raise wandb.errors.CommError("no server")

    monkeypatch.setattr(wandb, "Api", NoServer)
    with pytest.raises(LossArtifactUnavailable, match="wandb sync"):
        load_learned_loss("wandb-artifact://e/p/learned-loss-ml3-sine:v0")
