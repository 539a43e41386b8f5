"""casa chat: the interactive form (streamed replies, /image, /video, /reset, a bad image is one
error line and the chat goes on) and the form for scripts (messages JSON in, the reply out), both
giving the tokens casa's Python API gives."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import run_casa
from PIL import Image
from test_hub import TOK, tiny

from casa.hub.model import CasaForConditionalGeneration
from casa.training.checkpoint import save_checkpoint


def setup(tmp_path):
    run = tmp_path / "run"
    m = tiny()
    save_checkpoint(run, 1, m, {"step": 1}, tokenizer=TOK, processor=m.processor)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "frames" / f"{i}.png")
    return run, CasaForConditionalGeneration.from_pretrained(run)


def test_chat_for_scripts_and_interactive(tmp_path):
    run, model = setup(tmp_path)
    messages = [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                             {"type": "text", "text": "What colour?"}]}]
    (tmp_path / "m.json").write_text(json.dumps({"messages": messages}))
    done = run_casa("chat", "--checkpoint", run, "--messages", tmp_path / "m.json", "--json", "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    image = Image.open(tmp_path / "a.png")
    want = model.chat(max_new_tokens=6).ask("What colour?", [image])
    assert answer["tokens"] == want.tokens and answer["reply"] == want.text
    frames = [Image.open(tmp_path / "frames" / f"{i}.png") for i in range(3)]
    chat = model.chat(max_new_tokens=6)
    first, second = chat.ask("What colour?", [image]), chat.ask("And now?", video=frames)
    fresh = model.chat(max_new_tokens=6).ask("hello")
    lines = ["/image a.png", "What colour?", "/video frames", "And now?", "/image missing.png", "/reset", "hello",
             "/nonsense", "/quit", "never read"]
    talk = subprocess.run([sys.executable, "-m", "casa.cli", "chat", "--checkpoint", str(run), "--max-new-tokens", "6"],
                          cwd=tmp_path, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "CASA_DEBUG": ""})
    assert talk.returncode == 0, talk.stderr
    assert talk.stdout == f"{first.text}\n{second.text}\n{fresh.text}\n"
    assert "casa: error: /image missing.png: cannot read image" in talk.stderr
    assert "(new conversation)" in talk.stderr and "unknown command '/nonsense'" in talk.stderr


def test_chat_refuses_bad_input(tmp_path, capsys):
    from casa.cli import main

    run, _ = setup(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps([{"role": "assistant", "content": "hi"}]))
    assert main(["chat", "--checkpoint", str(run), "--messages", str(tmp_path / "m.json")]) == 2
    assert "the last message must be the user's" in capsys.readouterr().err
    (tmp_path / "m.json").write_text("[{")
    assert main(["chat", "--checkpoint", str(run), "--messages", str(tmp_path / "m.json")]) == 2
    assert "not JSON" in capsys.readouterr().err
    assert main(["chat", "--checkpoint", str(run), "--json"]) == 2
    assert "--json: only with --messages" in capsys.readouterr().err
    assert main(["chat", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "not a casa model directory" in capsys.readouterr().err
