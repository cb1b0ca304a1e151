"""device / dtype / threads: every app runs where it is told, or says clearly why it cannot."""

import math

import pytest
import torch
from hydra.utils import instantiate

from metaloss.cli import eval as eval_app
from metaloss.cli import meta as meta_app
from metaloss.cli import train as train_app
from metaloss.losses.io import load_learned_loss
from metaloss.runtime import resolve_device
from metaloss.validate import ConfigError

TINY = [
    "logger=none",
    "progress=false",
    "meta.steps=2",
    "meta.tasks_per_step=2",
    "meta.inner_steps=2",
    "model.hidden=[8]",
    "loss.hidden=[8]",
    "meta_test.seeds=2",
    "meta_test.steps=5",
    "meta_test.tasks_per_seed=2",
]


def test_float64_meta_run_then_float32_eval(compose_cfg, tmp_path):
    out = meta_app.run(
        compose_cfg("meta", TINY + ["dtype=float64", "device=cpu", "threads=1"]), tmp_path, "ml3"
    )
    assert torch.get_num_threads() == 1
    saved = torch.load(tmp_path / "learned_loss.pt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float64 and v.device.type == "cpu" for v in saved.values())
    assert len(out["results"]["learned"]["test/mse"]) == 2
    ecfg = compose_cfg(
        "eval",
        [
            "logger=none",
            "progress=false",
            "model.hidden=[8]",
            "meta_test.seeds=2",
            "meta_test.steps=5",
            "dtype=float32",
            f"loss_path={tmp_path / 'learned_loss.pt'}",
        ],
    )
    torch.set_default_dtype(torch.float32)
    res = eval_app.run(ecfg, tmp_path / "eval")
    assert all(math.isfinite(v) for v in res["results"]["learned"]["test/mse"])  # ran in float32


def test_train_in_float64(compose_cfg, tmp_path):
    cfg = compose_cfg(
        "train",
        [
            "task=outliers",
            "loss=huber",
            "logger=none",
            "progress=false",
            "train.steps=5",
            "dtype=float64",
        ],
    )
    assert train_app.run(cfg, tmp_path, "huber") > 0


def test_a_missing_gpu_is_a_clear_error_before_compute(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device = 'cuda'.*no CUDA GPU"):
        meta_app.run(compose_cfg("meta", TINY + ["device=cuda"]), tmp_path, "ml3")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device = 'gpu0': must be auto, cpu, cuda or cuda:N"):
        meta_app.run(compose_cfg("meta", TINY + ["device=gpu0"]), tmp_path, "ml3")
    with pytest.raises(ConfigError, match="threads = 0"):
        meta_app.run(compose_cfg("meta", TINY + ["threads=0"]), tmp_path, "ml3")


def test_a_named_gpu_beyond_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"only 2 GPU\(s\).*cuda:0..cuda:1"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_learned_loss_loads_on_cpu_whatever_it_was_saved_from(tmp_path):
    from metaloss.losses.io import save_learned_loss
    from metaloss.losses.poly import PolyN

    loss = PolyN(degree=2).to(torch.float64)
    save_learned_loss(loss, tmp_path / "l.pt")
    back = load_learned_loss(tmp_path / "l.pt")
    assert next(back.parameters()).device.type == "cpu"


def test_a_seed_draws_the_same_data_and_weights_in_float32_and_float64(compose_cfg, tmp_path):
    """A float64 draw consumes the generator differently: data and initial weights are drawn
    in float32 and cast, so the two dtypes train on the same tasks from the same start."""
    from metaloss.runtime import task_pool
    from metaloss.train import build_model

    firsts = {}
    for dt in ("float32", "float64"):
        cfg = compose_cfg("meta", ["logger=none", f"dtype={dt}", "model.hidden=[8]"])
        import metaloss.runtime as rt

        _, dtype = rt.setup(cfg)
        task = task_pool(cfg)[0].to("cpu", dtype)
        model = build_model(instantiate(cfg.model), task, 3)
        firsts[dt] = (task.x_train[:5].double(), next(model.parameters()).detach().double())
        torch.set_default_dtype(torch.float32)
    for a, b in zip(firsts["float32"], firsts["float64"]):
        torch.testing.assert_close(a, b)
