"""Packaging metadata stays one source: the version lives in metaloss/__init__.py only."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import yaml

import metaloss

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_written_once():
    assert importlib.metadata.version("metaloss") == metaloss.__version__
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()  # from __init__
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["version"] == metaloss.__version__ and citation["cff-version"] == "1.2.0"
    assert (ROOT / "metaloss" / "py.typed").is_file()
