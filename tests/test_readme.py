"""The README's Python examples run as written (the OpenAI-client example
needs a running server: tests/test_serve.py makes the same calls against one)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    local = [code for code in blocks if "OpenAI(" not in code]
    assert len(local) >= 1 and len(blocks) - len(local) == 1
    for code in local:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)
        if "logits" in namespace:  # the quick-start example states the shape it returns
            B, T = namespace["batch"].input_ids.shape
            assert namespace["logits"].shape == (B, T, namespace["config"].lm.vocab_size)
            assert namespace["logits"].isfinite().all()


def test_every_casa_serve_flag_is_documented_in_its_section():
    from dataclasses import fields

    from casa.serve.limits import Limits, flag_name

    section = README.read_text().split("## Serve a model", 1)[1].split("\n## ", 1)[0]
    flags = [flag_name(f.name) for f in fields(Limits)] + ["--api-key", "--allowed-hosts"]
    assert not [f for f in flags if f"`{f}" not in section]
