"""Progress where there is no terminal: whole lines, at most one per LOG_SECONDS, and a last one at the end."""

from __future__ import annotations

from pipeline import progress as progress_module
from pipeline.progress import progress


def test_without_a_terminal_progress_is_whole_lines_ending_with_the_total(capsys):
    for _ in progress(range(5), desc="features", unit="img"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert lines[0].startswith("features:") and "0/5" in lines[0]
    assert "5/5" in lines[-1] and len(lines) <= 3  # the start, the end, and no redraw in between (LOG_SECONDS)


def test_a_line_per_update_when_the_interval_allows(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_SECONDS", 0.0)
    with progress(total=4, desc="verify images") as bar:
        for _ in range(4):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [f"{i}/4" in line for i, line in enumerate(lines[:5])] == [True] * 5
