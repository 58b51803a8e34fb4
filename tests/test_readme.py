"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    model = namespace["model"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("padapter_" in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_readme_quick_start_has_exactly_the_two_commands():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make \w+", quick, flags=re.M)
    assert commands == ["make demo", "make test"]
