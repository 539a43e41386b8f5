"""Stage 0 of `casa study`: the pretrained parts every variant starts from.

The paper adapts a pretrained text LM (Helium, Qwen) and a pretrained vision
encoder (SigLIP, Qwen-ViT); starting from random weights instead makes CASA's
text keys noise to be learned around. At this scale both are pretrained here,
on the synthetic suite, once per stage-0 seed (the full study trains one and
every seed of stage 1 starts from it: `casa.study.run.stage0_seed`):

- **text LM**: a model without fusion layers trained on the suite's
  conversations with every image replaced by its caption in plain text
  (`[bs11 rc02] How many shapes are there?` -> `2`), loss on the answers. It
  knows the questions, the answer vocabulary, and how to answer from a
  description: what a pretrained LM brings. Answers only, because most of a
  described conversation is caption characters no model can predict: with
  the loss on every token, 2,000 steps left the LM answering fine-grained
  questions from their captions at 41-50% (digits, bars); on the answers,
  99% (digits) and 80% (bars). (A table asked by row and column stayed at
  21% here, and no arm learned it either; `table` now asks one column by its
  header, `casa.data.tasks.table`.)
- **vision encoder**: the model's ViT trained to write each image's caption
  (`casa.data.tasks`: digits, chart and table values by letter, shapes), CapPa-style:
  learned queries, one per caption character, cross-attend to the patch tokens
  and predict their character in parallel. Patch tokens then carry what is
  drawn, digits included, which a contrastive or class label would not force.

Design decisions:
- Stage 0 sees different samples from stage 1 (its own seed offset), and no
  evaluation sample (evaluation draws from `seed + EVAL_SEED_OFFSET`).
- The results are cached per stage-0 seed (`DIR/stage0/sSEED/`: `lm.safetensors`,
  `vision.safetensors`, `stats.json`, written atomically, stats last); a rerun
  reuses them, so every variant of a seed starts from the same bytes. Each
  part is saved when it is trained (with `lm_stats.json` / `vision_stats.json`
  after its weights), so an interrupt loses at most the part in progress.
- Both parts report progress about every tenth of their steps (minutes each
  at the full size).
- `init_stage1` builds a variant's model from them: LM weights by name (only
  fusion layers and the vision tower may be missing), fusion layers as copies
  of their block's self-attention (`init_from_sa`, the paper's init), the
  encoder loaded, the projector fresh.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from casa.config import ModelConfig, VisionConfig
from casa.core.loss import lm_loss
from casa.core.model import CasaModel
from casa.data import Processor, SyntheticSource
from casa.data.packing import Packer, pack_row
from casa.data.sample import Sample
from casa.data.tasks import Difficulty
from casa.files import atomic_file
from casa.pretrained.tokenizer import ByteTokenizer
from casa.training.config import TrainConfig
from casa.training.optim import lr_lambda
from casa.vision.preprocess import preprocess
from casa.vision.vit import ViT

__all__ = ["CaptionHead", "DescribedSource", "STAGE0_SEED_OFFSET", "caption_bytes", "init_stage1", "pretrain",
           "pretrain_lm", "pretrain_vision", "training_mix"]

STAGE0_SEED_OFFSET = 3000  # stage 0 draws samples from seed + 3000: none of stage 1's


def _described(sample: Sample) -> Sample:
    """`sample` with each image (or video frame) replaced by `[caption] ` in text."""
    captions = iter(sample.meta["captions"])
    messages = []
    for m in sample.messages:
        content = []
        for part in m["content"]:
            if part["type"] == "image":
                content.append({"type": "text", "text": f"[{next(captions)}] "})
            elif part["type"] == "video":
                content.append({"type": "text", "text": "".join(f"[{next(captions)}] " for _ in part["frames"])})
            else:
                content.append(part)
        messages.append({**m, "content": content})
    return Sample(messages, meta=sample.meta, source=sample.source + " (described)")


class DescribedSource(SyntheticSource):
    """The suite's samples as text only: every image replaced by its caption."""

    def __getitem__(self, i: int) -> Sample:
        return _described(super().__getitem__(i))


def _optimizer(params: list, lr: float, steps: int):
    """AdamW on the library's schedule (`training.optim.lr_lambda`: warmup over 5% of the steps, then
    cosine to 10%); returns `step(loss) -> float`: backward, clip, update, and the loss's value."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = lr_lambda(TrainConfig(steps=steps, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    def step(loss: torch.Tensor) -> float:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


PROGRESS_AFTER_S = 5.0  # a part done sooner than this (the quick study's) says nothing until it ends


def _progress(say, what: str, steps: int):
    """A function `(step, losses, t0)` that says how `what` goes about every tenth of its `steps`, once it
    has taken `PROGRESS_AFTER_S` seconds."""
    every = max(1, steps // 10)

    def report(step: int, losses: list[float], t0: float) -> None:
        if say is not None and step % every == 0 and step < steps and time.perf_counter() - t0 >= PROGRESS_AFTER_S:
            recent = losses[-every:]
            elapsed = time.perf_counter() - t0
            say(f"  {what}: step {step}/{steps}, loss {sum(recent) / len(recent):.3f}, {elapsed:.0f} s, "
                f"about {elapsed / step * (steps - step):.0f} s left")

    return report


def pretrain_lm(model_cfg: ModelConfig, tasks, difficulty: Difficulty, *, seed: int, steps: int,
                text_tokens: int, lr: float, say=None) -> tuple[dict, dict]:
    """Train the text LM on described conversations; returns (its state dict without the vision tower, stats).
    `say`: where progress lines go, about every tenth of the steps (None: silent)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "fusion": {"variant": "insertion"}})
    model = CasaModel(cfg).train()
    processor = Processor(ByteTokenizer(), cfg.vision)
    source = DescribedSource(tasks, seed=seed + STAGE0_SEED_OFFSET, difficulty=difficulty)
    packs = Packer(source, processor, text_tokens=text_tokens, image_tokens=0).packs()
    step = _optimizer([p for n, p in model.named_parameters() if not n.startswith("vision.")], lr, steps)
    t0, losses, progress = time.perf_counter(), [], _progress(say, f"stage 0, seed {seed}: text LM", steps)
    for i in range(steps):
        pack = next(packs)
        batch = pack_row(pack.docs)
        losses.append(step(lm_loss(model(batch), batch)))
        progress(i + 1, losses, t0)
    k = max(1, steps // 10)
    state = {n: t.detach().clone() for n, t in model.state_dict().items() if not n.startswith("vision.")}
    return state, {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": sum(losses[-k:]) / k}


class CaptionHead(nn.Module):
    """Parallel caption decoder (CapPa-style): `length` learned queries cross-attend to the patch tokens;
    query `i` predicts the caption's byte `i` (0 past its end)."""

    def __init__(self, *, d_model: int, n_heads: int, length: int, layers: int = 2):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(length, d_model) * 0.02)
        layer = nn.TransformerDecoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.out = nn.Linear(d_model, 256)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """`patches [N, P, D]` -> byte logits `[N, length, 256]`."""
        return self.out(self.decoder(self.queries.expand(len(patches), -1, -1), patches))


def caption_bytes(captions: list[str], length: int) -> torch.Tensor:
    """`[N, length]` long: each caption's bytes, 0-padded (a caption longer than `length` is cut)."""
    out = torch.zeros(len(captions), length, dtype=torch.long)
    for i, c in enumerate(captions):
        b = list(c.encode())[:length]
        out[i, : len(b)] = torch.tensor(b)
    return out


def training_mix(tasks, mix: dict | None) -> list[str]:
    """The training task list: each task of `tasks` listed `mix.get(task, 1)` times, so that
    `SyntheticSource` draws it that much more often (evaluation keeps one entry per task)."""
    return [t for t in tasks for _ in range((mix or {}).get(t, 1))]


def _images(tasks, seed: int, difficulty: Difficulty, start: int, n: int):
    """(images, captions) of the samples `start..` of the round-robin suite, until `n` images."""
    source = SyntheticSource(tasks, seed=seed, difficulty=difficulty)
    images, captions, i = [], [], start
    while len(images) < n:
        s = source[i]
        for m in s.messages:
            for part in m["content"]:
                if part["type"] == "image":
                    images.append(part["image"])
                elif part["type"] == "video":
                    images.extend(part["frames"])
        captions.extend(s.meta["captions"])
        i += 1
    return images[:n], captions[:n], i


def pretrain_vision(vision: VisionConfig, tasks, difficulty: Difficulty, *, seed: int, steps: int, batch: int,
                    lr: float, length: int = 24, say=None) -> tuple[dict, dict]:
    """Train the ViT to caption the suite's images; returns (the encoder's state dict, stats). `say`: as
    `pretrain_lm`'s."""
    torch.manual_seed(seed)
    encoder = ViT(vision).train()
    head = CaptionHead(d_model=encoder.out_width, n_heads=vision.n_heads, length=length)
    step = _optimizer([*encoder.parameters(), *head.parameters()], lr, steps)
    tasks, position, losses = list(tasks), 0, []
    t0, progress = time.perf_counter(), _progress(say, f"stage 0, seed {seed}: vision encoder", steps)
    for i in range(steps):
        images, captions, position = _images(tasks, seed + STAGE0_SEED_OFFSET, difficulty, position, batch)
        pixels = preprocess(images, vision)
        logits = head(encoder(pixels))  # [N, length, 256]
        losses.append(step(F.cross_entropy(logits.flatten(0, 1), caption_bytes(captions, length).flatten())))
        progress(i + 1, losses, t0)
    # held out, on samples stage 1 never trains on: whole captions read exactly (overall and per
    # task: what each task's encoder features can carry) and bytes right
    encoder.eval()
    exact = {}
    with torch.no_grad():
        for task in dict.fromkeys(tasks):
            images, captions, _ = _images([task], seed + STAGE0_SEED_OFFSET + 1, difficulty, 0, 48)
            pred = head(encoder(preprocess(images, vision))).argmax(-1)
            gold = caption_bytes(captions, length)
            exact[task] = (pred == gold).all(-1).float().mean().item(), (pred == gold).float().mean().item()
    k = max(1, steps // 10)
    return ({n: t.detach().clone() for n, t in encoder.state_dict().items()},
            {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": sum(losses[-k:]) / k,
             "caption_exact": sum(e for e, _ in exact.values()) / len(exact),
             "char_accuracy": sum(c for _, c in exact.values()) / len(exact),
             "caption_exact_per_task": {t: e for t, (e, _) in exact.items()}})


def _saved_part(d: Path, name: str) -> dict | None:
    """The stats of a stage-0 part an earlier invocation finished (its weights stay on disk), or None."""
    weights, stats = d / f"{name}.safetensors", d / f"{name}_stats.json"
    if weights.is_file() and stats.is_file():
        return json.loads(stats.read_text())
    return None


def _save_part(d: Path, name: str, state: dict, stats: dict) -> None:
    """One finished stage-0 part: its weights, then its stats (the stats file marks it complete)."""
    from safetensors.torch import save

    with atomic_file(d / f"{name}.safetensors", "wb") as f:
        f.write(save({k: v.contiguous() for k, v in state.items()}))
    with atomic_file(d / f"{name}_stats.json") as f:
        json.dump(stats, f, indent=1)


def pretrain(root: Path, model_cfg: ModelConfig, tasks, difficulty: Difficulty, spec: dict, seed: int,
             say=print) -> dict:
    """Stage 0 of one seed, cached in `root/sSEED/`; returns its stats (with the two weight files' paths).

    Each part (the text LM, the vision encoder) is saved as soon as it is trained, so an interrupted
    stage 0 keeps the part it finished and a rerun trains only the other; `stats.json` marks the seed
    complete."""
    d = Path(root) / f"s{seed}"
    stats_path = d / "stats.json"
    if stats_path.is_file():
        say(f"  stage 0, seed {seed}: reuse {d}")
        return {**json.loads(stats_path.read_text()), "dir": str(d)}
    d.mkdir(parents=True, exist_ok=True)
    lm_stats = _saved_part(d, "lm")
    if lm_stats is not None:
        say(f"  stage 0, seed {seed}: reuse the text LM in {d}")
    else:
        lm, lm_stats = pretrain_lm(model_cfg, tasks, difficulty, seed=seed, steps=spec["lm_steps"],
                                   text_tokens=spec["lm_tokens"], lr=spec["lm_lr"], say=say)
        _save_part(d, "lm", lm, lm_stats)
        say(f"  stage 0, seed {seed}: text LM {lm_stats['steps']} steps, loss {lm_stats['final_loss']:.3f}, "
            f"{lm_stats['seconds']:.0f} s; saved in {d}")
    v_stats = _saved_part(d, "vision")
    if v_stats is not None:
        say(f"  stage 0, seed {seed}: reuse the vision encoder in {d}")
    else:
        vision, v_stats = pretrain_vision(model_cfg.vision, tasks, difficulty, seed=seed,
                                          steps=spec["vision_steps"], batch=spec["vision_batch"],
                                          lr=spec["vision_lr"], say=say)
        _save_part(d, "vision", vision, v_stats)
        say(f"  stage 0, seed {seed}: vision encoder {v_stats['steps']} steps, held-out captions exact "
            f"{v_stats['caption_exact']:.2f}, bytes {v_stats['char_accuracy']:.3f}, {v_stats['seconds']:.0f} s; "
            f"saved in {d}")
    stats = {"seed": seed, "lm": lm_stats, "vision": v_stats}
    with atomic_file(stats_path) as f:
        json.dump(stats, f, indent=1)
    return {**stats, "dir": str(d)}


def init_stage1(model_cfg: ModelConfig, stage0_dir) -> CasaModel:
    """A variant's model from stage 0: LM weights by name, fusion layers copied from SA when
    `fusion.init_from_sa`, the vision encoder loaded, the projector fresh."""
    from safetensors.torch import load_file

    d = Path(stage0_dir)
    model = CasaModel(model_cfg)
    lm = load_file(str(d / "lm.safetensors"))
    missing, unexpected = model.load_state_dict(lm, strict=False)
    fusion = {n for n, _ in model.named_parameters() if ".fusion." in n or n.startswith("vision.")}
    fusion |= {n for n, _ in model.named_buffers() if ".fusion." in n or n.startswith("vision.")}
    if unexpected or set(missing) - fusion:
        raise ValueError(f"{d}: stage-0 LM weights do not fit this model (unexpected {unexpected[:3]}, "
                         f"missing {sorted(set(missing) - fusion)[:3]})")
    if model_cfg.fusion.init_from_sa:
        model.init_fusion_from_sa()
    model.vision.encoder.load_state_dict(load_file(str(d / "vision.safetensors")))
    return model
