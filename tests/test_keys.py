"""metaloss.keys is the one table of keys that do not define a result: run identity, W&B
groups and the report all follow it, so a key added there is ignored by all three."""

from __future__ import annotations

import yaml

from metaloss import keys, runs
from metaloss.cli import logger
from metaloss.report import _overrides

LOCAL_OVERRIDES = [
    "progress=false",
    "logger=none",
    "logger.project=x",
    "hydra.run.dir=/tmp/x",
    "trusted_modules=[my_pkg]",
    "threads=1",
]


def test_the_readers_take_their_keys_from_the_table():
    assert runs.VOLATILE is keys.VOLATILE
    assert set(keys.LOCAL) <= set(keys.VOLATILE) and set(keys.LOCAL) <= set(keys.NOT_SETTINGS)
    assert set(keys.LOCAL) <= set(keys.REPORT_IGNORED)
    assert "meta.steps" in keys.continuation(online=False)  # offline: more steps continue
    assert "meta.steps" not in keys.continuation(online=True)  # online: the budget shapes φ


def test_keys_that_do_not_define_a_result_change_no_identity_group_or_report_row(tmp_path):
    base = {"seed": 0, "loss": {"_target_": "a.B"}, "task": {"_target_": "c.D"}, "lr": 0.1}
    local = {**base, "progress": False, "logger": {"project": "p"}, "threads": 3,
             "trusted_modules": ["my_pkg"], "hydra": {"run": {"dir": "/x"}}}  # fmt: skip
    for ignore in (keys.LOCAL, keys.VOLATILE, keys.NOT_SETTINGS):
        assert runs.identity(local, ignore) == runs.identity(base, ignore)
    # W&B: none of them enters a group name
    assert logger.default_group(base, ([*LOCAL_OVERRIDES, "lr=0.1"], {})) == "lr=0.1"
    # the report: none of them splits rows, a result-defining key does
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([*LOCAL_OVERRIDES, "seed=3", "seeds=3", "lr=0.1"])
    )
    assert _overrides(tmp_path) == ["seeds=3", "lr=0.1"]
