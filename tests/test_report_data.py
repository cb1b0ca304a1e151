"""metaloss-report reads comparison.json / metrics.json as data: nothing in them is
instantiated or called, and a malformed file is refused naming the file and the key
(issue 15: files are data, never code)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from metaloss.report import UnreadableResult, collect

GOOD = {
    "task": "digits",
    "metric": "test/acc",
    "seeds": [0, 1],
    "results": {"learned": {"test/acc": [0.5, None]}, "ce": {"test/acc": [0.6, 0.7]}},
    "hyperparameters": {"ce": {"params": {}, "lr": 0.05, "source": "config"}},
}


def _write(tmp_path, rec, name="comparison.json"):
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / name).write_text(json.dumps(rec))
    return tmp_path / "run" / name


def test_a_good_comparison_is_read_with_null_as_nan(tmp_path):
    _write(tmp_path, GOOD)
    groups = collect(tmp_path)
    assert (
        groups["ce"]["test/acc"] == [0.6, 0.7]
        and groups["learned"]["test/acc"][1] != groups["learned"]["test/acc"][1]
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda r: r["results"]["ce"].update({"test/acc": [True, 0.7]}),
            r"results\.ce\.test/acc = \[True, 0\.7\]: must be a list",
        ),
        (
            lambda r: r["results"]["ce"].update({"test/acc": ["0.6", 0.7]}),
            r"results\.ce\.test/acc = \['0\.6', 0\.7\]",
        ),
        (
            lambda r: r["results"]["ce"].update({"test/acc": 0.6}),
            r"results\.ce\.test/acc = 0\.6: must be a list",
        ),
        (
            lambda r: r["results"].update({"ce": [0.6]}),
            r"results\.ce = \[0\.6\]: must be a mapping",
        ),
        (
            lambda r: r["hyperparameters"]["ce"]["params"].update({"_target_": "os.remove"}),
            r"hyperparameters\.ce\.params\._target_: names code to call",
        ),
        (lambda r: r.update({"_target_": "builtins.exec"}), r"\n  _target_: names code to call"),
    ],
)
def test_a_malformed_comparison_is_refused_naming_file_and_key(tmp_path, edit, message):
    rec = json.loads(json.dumps(GOOD))
    edit(rec)
    path = _write(tmp_path, rec)
    with pytest.raises(UnreadableResult, match=message) as e:
        collect(tmp_path)
    assert str(path) in str(e.value)


def test_a_malformed_metrics_json_is_refused(tmp_path):
    _write(tmp_path, {"loss": "ce", "metrics": {"test/acc": "high"}}, "metrics.json")
    with pytest.raises(
        UnreadableResult, match=r"metrics\.json: not a valid.*\n  metrics\.test/acc = 'high'"
    ):
        collect(tmp_path)


def test_a_comparison_nested_past_the_parsers_depth_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "comparison.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UnreadableResult, match="not readable JSON"):
        collect(tmp_path)


def test_metaloss_report_exits_with_one_message_naming_the_file(tmp_path):
    rec = json.loads(json.dumps(GOOD))
    rec["results"]["ce"]["test/acc"] = [True, False]
    path = _write(tmp_path, rec)
    bin_dir = Path(sys.executable).parent
    out = subprocess.run(
        [str(bin_dir / "metaloss-report"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        out.returncode != 0
        and str(path) in out.stderr + out.stdout
        and "results.ce.test/acc" in out.stderr + out.stdout
    )
    assert "Traceback" not in out.stderr


def test_a_comparison_that_parses_but_nests_deep_is_refused(tmp_path):
    """A file that parses but nests deeper than any result (here 200 levels; near a thousand,
    a recursive walk over its values would end in a RecursionError traceback) is refused with
    one message, measured without recursion (metaloss.runs.nesting_depth)."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "comparison.json").write_text('{"results": {}, "x": ' + "[" * 200 + "]" * 200 + "}")
    with pytest.raises(UnreadableResult, match="nested deeper than 32"):
        collect(tmp_path)
