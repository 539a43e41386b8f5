import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import json

import pytest
import torch
from PIL import Image

from casa.eval import stdbench
from casa.eval.stdbench import format_question, load_items, run_standard_benchmark
from casa.eval.stdbench.metrics import (
    EvalAIAnswerProcessor,
    choice_letter,
    exact_match,
    vqa_accuracy,
)

# ----------------------------------------------------------------------------- metrics, worked examples


@pytest.mark.parametrize("pred,answers,score", [
    ("cat", ["cat"] * 2 + ["dog"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
    ("cat", ["cat"] * 3 + ["dog"] * 7, 0.9),  # (3 * 2/3 + 7 * 1) / 10
    ("cat", ["cat"] * 4 + ["dog"] * 6, 1.0),
    ("cat", ["cat"] + ["dog"] * 9, 0.3),  # (1 * 0 + 9 * 1/3) / 10
    ("bird", ["cat"] * 10, 0.0),
    ("Two.", ["2"] * 10, 1.0),  # number words, trailing period
    ("the dog", ["dog"] * 10, 1.0),  # articles
    ("dont", ["don't"] * 10, 1.0),  # contractions
    ("Yes!", ["yes"] * 3 + ["no"] * 7, 0.9),  # punctuation, case
])
def test_vqa_accuracy(pred, answers, score):
    assert vqa_accuracy(pred, answers) == pytest.approx(score)


def test_evalai_normalisation():
    norm = EvalAIAnswerProcessor()
    assert norm("The Cat's toy") == "cat 's toy"
    assert norm("3,000") == "3000" and norm("1.5") == "1.5" and norm("cat/dog") == "cat dog" and norm("a/b") == "b"
    assert norm("  Ten\tdogs ") == "10 dogs"


@pytest.mark.parametrize("pred,letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("b", "B"), ("D) fish", "D"), ("The answer is A.", "A"),
    ("Answer: C", "C"), ("dog", "B"), ("I think it is C. bird", "C"), ("E", None), ("a whale", None),
])
def test_choice_letter(pred, letter):
    assert choice_letter(pred, ["cat", "dog", "bird", "fish"]) == letter


def test_exact_match():
    assert exact_match("Yes.", "yes") == 1 and exact_match("left side", "left") == 0


def test_paper_prompts():
    assert format_question("chartqa", "What is the value?") == \
        "What is the value?\nAnswer the question using a single word or phrase."
    assert format_question("ai2d", "Which is a predator", ["cat", "dog"]) == \
        "Question: Which is a predator?\nChoices:\nA. cat\nB. dog\nAnswer with the letter."
    assert format_question("ai2d", "Pick one.", ["x"]).startswith("Question: Pick one.\n")


# ----------------------------------------------------------------------------- fake benchmark directories


def png(color=(255, 0, 0), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def save_img(path, color=(0, 0, 255)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), color).save(path)


def parquet(path, columns: dict):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: [{"bytes": v, "path": None} for v in vals] if k == "image" else vals for k, vals in columns.items()}
    pq.write_table(pa.table(cols), path)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_benchmark(root, name, layout):
    """A two-question copy of `name` in `layout`; returns the expected (question, answers, options)."""
    img = png()
    if name == "chartqa" and layout == "parquet":
        parquet(root / "data" / "test-00000-of-00001.parquet", {
            "type": ["human_test", "augmented_test"], "question": ["How many?", "Max value?"],
            "answer": ["12", "3.5"], "image": [img, img]})
        parquet(root / "data" / "val-00000-of-00001.parquet", {  # another split: ignored
            "type": ["human_val"], "question": ["no"], "answer": ["0"], "image": [img]})
        return [("How many?", ["12"], None), ("Max value?", ["3.5"], None)]
    if name == "chartqa":
        base = root / "ChartQA Dataset" / "test"
        write_json(base / "test_human.json", [{"imgname": "a.png", "query": "How many?", "label": "12"}])
        write_json(base / "test_augmented.json", [{"imgname": "b.png", "query": "Max value?", "label": "3.5"}])
        save_img(base / "png" / "a.png")
        save_img(base / "png" / "b.png")
        return [("Max value?", ["3.5"], None), ("How many?", ["12"], None)]
    if name in ("docvqa", "infovqa") and layout == "parquet":
        for sub, q in (("DocVQA", "What is the date?"), ("InfographicVQA", "Which country?")):
            parquet(root / sub / "validation-00000-of-00001.parquet", {
                "questionId": [1, 2], "question": [q, q + " (2)"], "answers": [["1 May", "May 1"], ["x"]],
                "image": [img, img]})
            parquet(root / sub / "test-00000-of-00001.parquet", {
                "questionId": [9], "question": ["hidden"], "answers": [None], "image": [img]})
        q = "What is the date?" if name == "docvqa" else "Which country?"
        return [(q, ["1 May", "May 1"], None), (q + " (2)", ["x"], None)]
    if name == "docvqa":
        write_json(root / "val" / "val_v1.0.json", {"dataset_name": "docvqa", "data": [
            {"questionId": 1, "question": "What is the date?", "image": "documents/d1.png", "answers": ["1 May"]},
            {"questionId": 2, "question": "Who signed?", "image": "documents/d2.png", "answers": ["Ann", "ann b"]}]})
        save_img(root / "val" / "documents" / "d1.png")
        save_img(root / "val" / "documents" / "d2.png")
        return [("What is the date?", ["1 May"], None), ("Who signed?", ["Ann", "ann b"], None)]
    if name == "infovqa":
        write_json(root / "infographicsVQA_val_v1.0_withQT.json", {"data": [
            {"questionId": 7, "question": "Which country?", "image_local_name": "i7.jpeg", "answers": ["France"]},
            {"questionId": 8, "question": "How many?", "image_local_name": "i8.jpeg", "answers": ["4", "four"]}]})
        save_img(root / "infographicsvqa_images" / "i7.jpeg")
        save_img(root / "infographicsvqa_images" / "i8.jpeg")
        return [("Which country?", ["France"], None), ("How many?", ["4", "four"], None)]
    if name == "textvqa" and layout == "parquet":
        parquet(root / "data" / "validation-00000-of-00001.parquet", {
            "question_id": [1, 2], "question": ["What brand?", "What number?"],
            "answers": [["nike"] * 10, ["7"] * 6 + ["seven"] * 4], "image": [img, img]})
        return [("What brand?", ["nike"] * 10, None), ("What number?", ["7"] * 6 + ["seven"] * 4, None)]
    if name == "textvqa":
        write_json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
            {"question_id": 1, "question": "What brand?", "image_id": "ab12", "answers": ["nike"] * 10},
            {"question_id": 2, "question": "What word?", "image_id": "cd34", "answers": ["stop"] * 10}]})
        save_img(root / "train_images" / "ab12.jpg")
        save_img(root / "train_images" / "cd34.jpg")
        return [("What brand?", ["nike"] * 10, None), ("What word?", ["stop"] * 10, None)]
    if name == "ai2d" and layout == "parquet":
        parquet(root / "data" / "test-00000-of-00001.parquet", {
            "question": ["Which eats grass?", "What is shown?"], "options": [["lion", "cow", "hawk"], ["sun", "moon"]],
            "answer": ["1", "0"], "image": [img, img]})
        return [("Which eats grass?", ["B"], ["lion", "cow", "hawk"]), ("What is shown?", ["A"], ["sun", "moon"])]
    if name == "ai2d":
        for n, (q, opts, ans) in {"7": ("Which eats grass?", ["lion", "cow", "hawk"], 1),
                                  "8": ("What is shown?", ["sun", "moon"], 0),
                                  "9": ("Train only?", ["a", "b"], 0)}.items():
            write_json(root / "questions" / f"{n}.png.json", {"imageName": f"{n}.png", "questions": {
                q: {"answerTexts": opts, "correctAnswer": ans, "abcLabel": False, "questionId": f"{n}.png-0"}}})
            save_img(root / "images" / f"{n}.png")
        (root / "ai2d_test_ids.csv").write_text("7\n8\n")
        return [("Which eats grass?", ["B"], ["lion", "cow", "hawk"]), ("What is shown?", ["A"], ["sun", "moon"])]
    if name == "gqa" and layout == "parquet":
        parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", {
            "id": ["q1", "q2"], "imageId": ["n2", "n1"], "question": ["Is it red?", "What is on the left?"],
            "answer": ["yes", "cup"], "fullAnswer": ["Yes, it is.", "A cup."]})
        parquet(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", {
            "id": ["n1", "n2"], "image": [png((0, 255, 0)), img]})
        return [("Is it red?", ["yes"], None), ("What is on the left?", ["cup"], None)]
    write_json(root / "testdev_balanced_questions.json", {
        "q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes"},
        "q2": {"imageId": "n2", "question": "What is on the left?", "answer": "cup"}})
    save_img(root / "images" / "n1.jpg")
    save_img(root / "images" / "n2.jpg")
    return [("Is it red?", ["yes"], None), ("What is on the left?", ["cup"], None)]


CASES = [(n, layout) for n in stdbench.BENCHMARKS for layout in ("parquet", "original")]


@pytest.mark.parametrize("name,layout", CASES)
def test_layouts(tmp_path, name, layout):
    expected = make_benchmark(tmp_path, name, layout)
    items = list(load_items(name, tmp_path))
    assert [(i.question, i.answers, i.options) for i in items] == expected
    img = items[0].pil()
    assert img.mode == "RGB" and img.size == (24, 20)
    if name == "gqa" and layout == "parquet":  # joined on the image id
        assert items[1].pil().getpixel((0, 0)) == (0, 255, 0)
    if name == "chartqa":
        assert {i.group for i in items} in ({"human_test", "augmented_test"}, {"human", "augmented"})


def test_missing_benchmark(tmp_path):
    with pytest.raises(FileNotFoundError, match="no validation questions"):
        list(load_items("docvqa", tmp_path))
    with pytest.raises(ValueError, match="unknown benchmark"):
        list(load_items("mmmu", tmp_path))


# ----------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def tiny_model():
    from casa.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
    from casa.core.model import CasaModel

    torch.manual_seed(0)
    cfg = ModelConfig(lm=LMConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
                      vision=VisionConfig(image_size=16, patch_size=8, d_model=16, n_layers=1, n_heads=2, d_ff=32),
                      fusion=FusionConfig(variant="casa"))
    return CasaModel(cfg).eval()


@pytest.mark.parametrize("name", list(stdbench.BENCHMARKS))
def test_oracle_scores_one(tmp_path, tiny_model, monkeypatch, name):
    """Decoding the gold answer scores 1 on every benchmark: prompts, decoding and metrics fit together."""
    import casa.eval.decode
    from casa.pretrained.tokenizer import ByteTokenizer

    expected = make_benchmark(tmp_path, name, "parquet")
    tok = ByteTokenizer()
    golds = iter([a[0] for _, a, _ in expected])
    seen = []

    def oracle(model, prompts, processor, **kw):
        seen.extend(tok.decode(p.ids) for p in prompts)
        assert all(p.n_images == 1 and p.pixels.shape == (1, 3, 16, 16) for p in prompts)
        return [tok.encode(next(golds) + ("." if name in ("chartqa", "docvqa") else "")) for _ in prompts]

    monkeypatch.setattr(casa.eval.decode, "greedy_decode", oracle)
    result = run_standard_benchmark(tiny_model, tok, name, tmp_path, batch_size=1)
    assert result["score"] == 1.0 and result["n"] == 2, result["predictions"]
    assert result["metric"] == stdbench.BENCHMARKS[name].metric
    want = "Answer with the letter." if name == "ai2d" else "Answer the question using a single word or phrase."
    assert all(want in s and expected[i][0] in s for i, s in enumerate(seen))
    if name == "chartqa":
        assert result["groups"] == {"augmented_test": 1.0, "human_test": 1.0}


def test_real_decoding_and_cli_run(tmp_path, tiny_model, capsys):
    from casa.pretrained.directory import save_pretrained
    from casa.pretrained.tokenizer import ByteTokenizer

    make_benchmark(tmp_path / "bench", "textvqa", "original")
    result = run_standard_benchmark(tiny_model, ByteTokenizer(), "textvqa", tmp_path / "bench", max_new_tokens=3,
                                    limit=1)
    [record] = result["predictions"]
    # the prediction is the model's own greedy answer to the release's prompt, scored by VQA accuracy
    from casa.data import Processor
    from casa.eval.decode import greedy_decode

    proc = Processor(ByteTokenizer(), tiny_model.config.vision)
    item = next(load_items("textvqa", tmp_path / "bench"))
    enc = proc.encode({"messages": [
        {"role": "user", "content": [{"type": "image", "image": item.pil()},
                                     {"type": "text", "text": format_question("textvqa", item.question)}]},
        {"role": "assistant", "content": item.answers[0]}]})
    want = ByteTokenizer().decode(greedy_decode(tiny_model, [enc.prefix(enc.turns[0][0])], proc, max_new_tokens=3)[0])
    assert record["prediction"] == want.strip() and record["answers"] == ["nike"] * 10
    assert record["score"] == vqa_accuracy(want.strip(), ["nike"] * 10) == result["score"] and result["n"] == 1

    model_dir = save_pretrained(tiny_model, tmp_path / "m", tokenizer=ByteTokenizer())
    from casa.eval.run import run_benchmark

    out = run_benchmark(model_dir, "textvqa", tmp_path / "bench", max_new_tokens=2, json_path=tmp_path / "r.json")
    assert out["n"] == 2 and "textvqa" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["metric"] == "vqa_accuracy" and len(saved["predictions"]) == 2


def test_casa_eval_bench_command(tmp_path, tiny_model, capsys):
    from casa.cli import main
    from casa.pretrained.directory import save_pretrained
    from casa.pretrained.tokenizer import ByteTokenizer

    make_benchmark(tmp_path / "bench", "textvqa", "original")
    model_dir = save_pretrained(tiny_model, tmp_path / "m", tokenizer=ByteTokenizer())
    rc = main(["eval", "--checkpoint", str(model_dir), "--bench", "textvqa", "--root", str(tmp_path / "bench"),
               "--limit", "1", "--json", str(tmp_path / "r.json")])
    assert rc == 0 and json.loads((tmp_path / "r.json").read_text())["n"] == 1
    assert main(["eval", "--checkpoint", str(model_dir), "--bench", "textvqa"]) == 2
    assert "--bench needs --root" in capsys.readouterr().err


def test_damaged_benchmark_files_are_named(tmp_path):
    from casa.data.sample import DataError
    from casa.files import DamagedFileError

    make_benchmark(tmp_path / "pq", "chartqa", "parquet")
    bad = tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(DamagedFileError, match=rf"{bad.name}' is damaged or incomplete \(not a readable parquet"):
        list(load_items("chartqa", tmp_path / "pq"))
    make_benchmark(tmp_path / "js", "textvqa", "original")
    (tmp_path / "js" / "TextVQA_0.5.1_val.json").write_text('{"data": [')
    with pytest.raises(DamagedFileError, match=r"TextVQA_0.5.1_val.json' is damaged or incomplete \(not valid JSON"):
        list(load_items("textvqa", tmp_path / "js"))
    (tmp_path / "js" / "TextVQA_0.5.1_val.json").write_text('{"data": [{"question": "q?"}]}')
    with pytest.raises(DataError, match=r"textvqa: a record under .* does not have the expected layout \(KeyError"):
        list(load_items("textvqa", tmp_path / "js"))
    (tmp_path / "js" / "train_images" / "ab12.jpg").write_bytes(b"not an image")
    (tmp_path / "js" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 1, "question": "What brand?", "image_id": "ab12", "answers": ["nike"] * 10}]}))
    [item] = load_items("textvqa", tmp_path / "js")
    with pytest.raises(DataError, match=r"question 1: cannot read image .*ab12.jpg"):
        item.pil()
