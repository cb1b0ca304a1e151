"""Errors read as errors: a refused setting or file prints one message on stderr (key, value,
what is valid) and no Python traceback, exit status 2; HYDRA_FULL_ERROR=1 adds the
traceback; a bug (any other exception) still shows its traceback, exit status 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full.update(WANDB_SILENT="true", **env)
    return subprocess.run(args, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=300)


def _assert_one_message(out: subprocess.CompletedProcess, *expected: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert "Error executing job" not in out.stderr  # Hydra's wrapper
    for text in expected:
        assert text in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize(
    "app, setting, expected",
    [
        ("train", "train.batch_size=-4", "train.batch_size = -4: must be an integer >= 1 or null"),
        (
            "meta",
            "meta.clip_grad_norm=-1",
            "meta.clip_grad_norm = -1: must be a number > 0 or null",
        ),
        ("eval", "meta_test.seeds=0", "meta_test.seeds = 0: must be"),
        ("tune", "seed=-1", "seed = -1: must be"),
    ],
)
def test_a_refused_setting_is_one_message_without_traceback(tmp_path, app, setting, expected):
    out = _run(
        [str(BIN / f"metaloss-{app}"), setting, "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
    )
    _assert_one_message(out, f"metaloss-{app}: error: ", expected, "HYDRA_FULL_ERROR=1")


def test_hydra_full_error_shows_the_traceback(tmp_path):
    out = _run(
        [
            str(BIN / "metaloss-train"),
            "train.batch_size=-4",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        HYDRA_FULL_ERROR="1",
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" in out.stderr and "metaloss.errors.ConfigError" in out.stderr, out.stderr[
        -3000:
    ]


def test_a_hydra_composition_error_is_one_message(tmp_path):
    out = _run([str(BIN / "metaloss-train"), "train.no_such_key=3"], tmp_path)
    _assert_one_message(out, "Could not override 'train.no_such_key'", "+train.no_such_key=3")


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_one_message(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    out = _run(
        [
            str(BIN / "metaloss-meta"),
            f"meta.resume_from={bad}",
            "logger=none",
            "progress=false",
            "meta_test.enabled=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    _assert_one_message(out, "cannot read checkpoint", str(bad))


_FAKE = textwrap.dedent("""
    import sys
    from metaloss.cli.signals import UserError, console

    class MyError(UserError):
        pass

    def main():
        if sys.argv[1] == "user":
            raise MyError("loss.alpha = -1: must be a number >= 0")
        raise RuntimeError("an internal bug")
    console(main)
""")


def test_user_error_subclasses_are_reported_and_bugs_keep_their_traceback(tmp_path):
    user = _run([sys.executable, "-c", _FAKE, "user"], tmp_path)
    _assert_one_message(user, "loss.alpha = -1: must be a number >= 0")
    bug = _run([sys.executable, "-c", _FAKE, "bug"], tmp_path)
    assert bug.returncode == 1, bug.stderr
    assert "Traceback" in bug.stderr and "RuntimeError: an internal bug" in bug.stderr, bug.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "local"])
def test_a_refused_setting_in_a_launched_sweep_is_one_message(tmp_path, launcher):
    """The job's exception travels back to the launching process, which reports it; Hydra's
    line naming the failing job's overrides stays (it says which job)."""
    out = _run(
        [
            str(BIN / "metaloss-meta"),
            "-m",
            f"hydra/launcher={launcher}",
            "meta.clip_grad_norm=-1",
            "seed=0,1",
            "logger=none",
        ],
        tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    assert "meta.clip_grad_norm = -1: must be a number > 0 or null" in out.stderr


def test_a_bad_tuned_json_read_by_an_interpolation_is_one_message(tmp_path):
    # a warm start reads its base's tuned values and lr through ${metaloss.tuned_params:...} /
    # ${metaloss.tuned_lr:...}: OmegaConf wraps the file's error, which is still refused as one
    # message naming the file and the key that read it (exit 2), not a bug's traceback
    missing = tmp_path / "nowhere" / "tuned.json"
    no_lr = json.loads((ROOT / "experiments" / "noise_sym40" / "tuned.json").read_text())
    no_lr["losses"]["gce"]["lr"] = None  # gce's params still read: only optim.lr fails
    (tmp_path / "no_lr.json").write_text(json.dumps(no_lr))
    for tuned, expected in [
        (missing, ["cannot read tuned baselines from", str(missing), "(reading loss.base_params)"]),
        (tmp_path / "no_lr.json", ["tuned 'gce' without its lr", "(reading optim.lr)"]),
    ]:
        out = _run(
            [
                str(BIN / "metaloss-meta"),
                "experiment=noise_sym40_warm_lr",
                f"meta_test.tuned={tuned}",
                "logger=none",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            tmp_path,
        )
        _assert_one_message(out, *expected)
        assert not (tmp_path / "run" / "learned_loss.pt").exists()


def test_a_bug_inside_a_resolver_keeps_its_traceback_even_while_handling_a_user_error():
    from omegaconf import OmegaConf

    from metaloss.cli.signals import USER_ERROR_STATUS, error_status
    from metaloss.tune import TunedFileError

    def refused(_):
        raise TunedFileError("a refused file")

    def buggy(_):
        try:
            refused(None)
        except TunedFileError:
            return None.attribute  # a bug in the handler: not the user's file

    OmegaConf.register_new_resolver("test_errors.refused", refused, replace=True)
    OmegaConf.register_new_resolver("test_errors.buggy", buggy, replace=True)
    statuses = {}
    for name in ("refused", "buggy"):
        cfg = OmegaConf.create({"x": "${test_errors." + name + ":1}"})
        with pytest.raises(Exception) as e:
            _ = cfg.x
        statuses[name] = error_status(e.value)
    assert statuses == {"refused": USER_ERROR_STATUS, "buggy": None}
