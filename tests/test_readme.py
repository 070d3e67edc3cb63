"""The README's Python example runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using wpgflow from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own code, not config data
    status, rows, gap = capsys.readouterr().out.split()
    assert status == "t_end" and int(rows) == 401 and 0 < float(gap) < 1.0  # t_end 1 at the config's dt 2.5e-3
    assert namespace["final"].p.shape == (1, 65)
