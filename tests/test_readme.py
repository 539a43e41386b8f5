"""The README and the docs pages it links: the README's Python examples run as
written (the OpenAI-client example needs a running server: tests/test_serve.py
makes the same calls against one), the README's commands that take seconds run
as written (the others are run by the tests of their command, `RUN_ELSEWHERE`),
every `casa` command shown in the README or a docs page is one the command
line accepts, every link resolves, the README
stays a front door (under 15 KB, set-up in the two `make` commands that CI
runs), and the serving page documents every flag of `casa serve`."""

import io
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def demo_run(root: Path) -> None:
    """What the load -> generate and load -> chat examples read: a run at runs/demo (a tiny model,
    as `casa demo` leaves one, trained or not) and an image, shape.png."""
    import torch
    from PIL import Image

    from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
    from casa.core.model import CasaModel
    from casa.data import Processor
    from casa.pretrained.tokenizer import ByteTokenizer
    from casa.training.checkpoint import save_checkpoint

    tok, vision = ByteTokenizer(), VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    torch.manual_seed(0)
    model = CasaModel(ModelConfig(lm=LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                              n_kv_heads=2, d_ff=64), vision=vision, fusion=FusionConfig()))
    save_checkpoint(root / "runs" / "demo", 10, model, {"step": 10}, tokenizer=tok, processor=Processor(tok, vision))
    Image.new("RGB", (40, 30), "red").save(root / "shape.png")


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    local = [code for code in blocks if "OpenAI(" not in code]
    assert len(local) >= 3 and local == blocks  # the OpenAI-client example is the serving page's
    assert "OpenAI(" in (ROOT / "docs" / "serving.md").read_text()
    demo_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    for code in local:
        namespace = {}
        exec(compile(code, str(README), "exec"), namespace)
        if "logits" in namespace:  # the quick-start example states the shape it returns
            B, T = namespace["batch"].input_ids.shape
            assert namespace["logits"].shape == (B, T, namespace["config"].lm.vocab_size)
            assert namespace["logits"].isfinite().all()
    loading = [code for code in local if "from_pretrained(" in code]
    assert len(loading) == 2 and all(len(code.strip().splitlines()) <= 10 for code in loading)  # load -> generate, chat
    assert capsys.readouterr().out.count("\n") >= 3  # a reply, then two chat answers


def test_every_casa_serve_flag_is_documented_in_its_section():
    from dataclasses import fields

    from casa.serve.limits import Limits, flag_name

    page = (ROOT / "docs" / "serving.md").read_text()
    flags = [flag_name(f.name) for f in fields(Limits)] + ["--api-key", "--allowed-hosts", "--media-dir"]
    assert not [f for f in flags if f"`{f}" not in page]


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.encode()) <= 15_000
    setup = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^make (\w+)", setup, re.M) == ["demo", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "\nmake test\n" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command
    for page in ("training", "streaming", "serving", "benchmarks", "study", "study_protocol", "design", "python",
                 "models"):
        assert f"(docs/{page}.md" in text, page
    figures = text.split("## Headline figures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in figures.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert rows and all(re.search(r"\| `[0-9a-f]{7}` \|", row) for row in rows)  # each figure names its commit


def test_every_link_of_the_readme_and_the_docs_resolves():
    for page in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path = target.split("#", 1)[0]
            assert not path or (page.parent / path).exists(), f"{page.name}: {target}"


def _commands(text: str):
    """The `casa` command lines of the bash blocks of `text` (continuations joined, comments dropped)."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w in ("casa", "casa.cli"):
                    yield line, words[i + 1:words.index("|", i) if "|" in words[i:] else None]
                    break


def test_every_casa_command_shown_is_one_the_command_line_accepts():
    from casa.cli import build_parser

    shown = [(page.name, line, argv) for page in [README, *DOCS] for line, argv in _commands(page.read_text())]
    assert len(shown) >= 25
    for name, line, argv in shown:
        try:
            build_parser().parse_args(argv)
        except (ValueError, SystemExit) as e:
            raise AssertionError(f"{name}: {line!r}: {e}") from None


# README commands that train, serve or benchmark for minutes: the test that runs each.
RUN_ELSEWHERE = {"demo": "test_demo.py", "train": "test_train.py", "serve": "test_serve.py", "build": "test_build.py",
                 "study": "test_study.py", "bench": "test_bench_attention.py"}


def test_the_readme_commands_run_as_shown(tmp_path, monkeypatch, capsys):
    from casa.cli import main

    text = README.read_text()
    shown = [argv for _, argv in _commands(text)]
    shown += [shlex.split(cell)[1:] for cell in re.findall(r"^\| `(casa [^`]*)`", text, re.M)]  # the command table
    assert {argv[0] for argv in shown} >= set(RUN_ELSEWHERE) | {"data", "caption", "chat", "eval", "export"}
    demo_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `casa chat` in a terminal: the user types nothing
    ran = []
    for argv in shown:
        if argv[0] not in RUN_ELSEWHERE:
            assert main(argv) == 0, f"casa {shlex.join(argv)}: {capsys.readouterr()}"
            ran.append(argv)
    # the sample video is captioned frame by frame (an untrained model's empty captions leave no subtitle)
    assert "captioned 8 frames; wrote sample.srt" in capsys.readouterr().err and (tmp_path / "sample.srt").exists()
    assert (tmp_path / "hf_demo" / "config.json").exists() and (tmp_path / "data" / "color.jsonl").exists()
    assert len(ran) >= 7
