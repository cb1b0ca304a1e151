"""Replace a generated block of README.md: the lines between ``<!-- <name>:start -->`` and
``<!-- <name>:end -->`` (each exactly once, in that order), so a table in README is written by
the script that made its record, never typed."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_block(name: str, lines: list[str], who: str, readme: Path = README) -> None:
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    text = readme.read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{who}: {readme} needs one {start.strip()} ... {end} block")
    head, rest = text.split(start)
    readme.write_text(head + start + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
