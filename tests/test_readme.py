"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for code in blocks:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)
        if "logits" in namespace:  # the quick-start example states the shape it returns
            B, T = namespace["batch"].input_ids.shape
            assert namespace["logits"].shape == (B, T, namespace["config"].lm.vocab_size)
            assert namespace["logits"].isfinite().all()
