"""The trainer behind `casa train`: one loop for 1 process, DDP and FSDP2.

Design decisions:
- Config: a JSON or TOML file `{"model": {...}, "train": {...}}` plus
  `--set section.key=value` overrides; unknown keys are errors naming them.
- Data: one deterministic stream of packs (`data.Packer`) from a sample
  position. Each optimizer step takes `world * grad_accum` consecutive packs;
  rank `r` runs packs `r, r + world, ...`. Every rank walks the whole stream,
  so all ranks agree on the position (one integer in the checkpoint) and on
  the number of target tokens of the step.
- Loss: summed cross-entropy over the step's target tokens divided by their
  global count (times `world`, which DDP/FSDP averaging divides back out), so
  every target token weighs the same however packs fall on ranks and micro
  steps: 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches.
- Parameter groups: "new" = fusion layers + projector, and everything when
  nothing was loaded (from scratch); "pretrained" = weights loaded from
  `init` / `lm_init` / an HF vision encoder. AdamW with decay on matrices only.
- Schedule: linear warmup, cosine decay to `min_lr_ratio`.
- Resume is exact: model, optimizer, scheduler, RNG of every rank, data
  position and loss history are restored from the latest checkpoint.
- SIGINT / SIGTERM set a flag; the step finishes, ranks agree (all-reduce),
  a checkpoint is saved and the trainer returns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from casa.config import ModelConfig, build
from casa.core.loss import loss_sum
from casa.core.model import CasaModel
from casa.data import Packer, Processor, make_source, pack_row
from casa.data.tasks import difficulty as make_difficulty
from casa.pretrained.directory import PROCESSOR_DEFAULTS, processor_settings
from casa.pretrained.runs import latest_checkpoint
from casa.pretrained.tokenizer import ByteTokenizer, HFTokenizer
from casa.training.checkpoint import load_state, save_checkpoint


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    init: str | None = None  # casa model directory to start from (else: new model from `model`)
    lm_init: str | None = None  # HF Llama/Qwen2 directory whose weights fill the LM
    tokenizer: str | None = None  # local HF tokenizer directory (default: the byte tokenizer)
    data: str = "color,count,position,compare"  # synthetic task names, or a .jsonl file
    eval_data: str | None = None  # default: the training tasks with seed + 1000
    difficulty: dict = field(default_factory=dict)
    seed: int = 0
    steps: int = 1000
    grad_accum: int = 1
    text_tokens: int = 2048  # per pack (= per micro-batch and rank)
    image_tokens: int = 20480
    lr_new: float = 1e-4
    lr_pretrained: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    freeze_lm: bool | None = None  # None: the policy recorded by `casa build` in `init`, else False
    vision_trainable_blocks: int | None = None  # -1: all; k >= 0: encoder frozen but its last k blocks
    precision: str = "auto"  # auto (bf16 where supported) | fp32 | bf16
    backend: str = "auto"
    device: str = "auto"
    # tokens around images; None: the model directory's (init / checkpoint), else the built-in defaults
    gist: bool | None = None
    gist_token: str | None = None
    image_prefix: str | None = None  # "" for none
    distributed: str = "ddp"  # ddp | fsdp (under torchrun)
    find_unused_parameters: bool = False  # DDP: set it for data with text-only packs
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic evaluation
    eval_samples: int = 16  # per task
    save_every: int = 100
    keep_last: int = 3
    skip_bad_samples: bool = False

    def __post_init__(self):
        self.betas = tuple(self.betas)
        choices = {"precision": ("auto", "fp32", "bf16"), "distributed": ("ddp", "fsdp")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"train.{key}={getattr(self, key)!r}: expected one of {allowed}")
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError("train.steps and train.grad_accum must be >= 1")


# ------------------------------------------------------------------ config
def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_config(path=None, overrides=(), base: dict | None = None) -> tuple[ModelConfig, TrainConfig]:
    """(model config, train config) from a JSON / TOML file, `base` and `key=value` overrides.

    Override keys are dotted paths (`train.steps=10`, `model.lm.d_model=64`);
    a bare key means `train.<key>`.
    """
    raw = json.loads(json.dumps(base or {}))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r}: no such config file")
        text = path.read_text()
        try:
            file_cfg = _toml().loads(text) if path.suffix == ".toml" else json.loads(text)
        except ValueError as e:
            raise ValueError(f"{str(path)!r}: cannot parse config: {e}") from None
        _merge(raw, file_cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        keys = key.strip().split(".")
        if keys[0] not in ("model", "train"):
            keys = ["train", *keys]
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = _parse_value(value)
    where = f"config {str(path)!r}" if path else "config"
    unknown = set(raw) - {"model", "train"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected sections 'model' and 'train'")
    try:
        model = ModelConfig.from_dict(raw.get("model", {}))
        train = build(TrainConfig, raw.get("train", {}), "train")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return model, train


def _toml():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


# ------------------------------------------------------------ distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x)
    return x


# -------------------------------------------------------------- the model
def build_model(model_cfg: ModelConfig, cfg: TrainConfig) -> tuple[CasaModel, set[str]]:
    """The model, and the names of parameters that hold pretrained weights."""
    from casa.pretrained.directory import from_pretrained

    if cfg.init:
        model = from_pretrained(cfg.init).train()
        return model, {n for n, _ in model.named_parameters()}
    model = CasaModel(model_cfg)
    pretrained = set()
    if cfg.lm_init:
        from casa.pretrained.hf_lm import load_lm_weights

        load_lm_weights(model, cfg.lm_init)
        model.init_fusion_from_sa()
        pretrained |= {n for n, _ in model.named_parameters() if not n.startswith("vision.")}
    if model_cfg.vision.kind == "hf":
        pretrained |= {n for n, _ in model.named_parameters() if n.startswith("vision.encoder.")}
    return model, pretrained


def new_parameter_names(model: CasaModel, pretrained: set[str]) -> set[str]:
    fusion = {id(p) for p in model.fusion_parameters()} | {id(p) for p in model.vision.projector.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in fusion or n not in pretrained}


def freeze_policy(cfg: TrainConfig) -> tuple[bool, int]:
    """(freeze_lm, vision_trainable_blocks): the config's, else what `casa build` recorded in `init`."""
    recorded = {}
    if cfg.init:
        from casa.pretrained.build import read_policy

        recorded = read_policy(cfg.init)
    freeze_lm = cfg.freeze_lm if cfg.freeze_lm is not None else recorded.get("freeze_lm", False)
    k = cfg.vision_trainable_blocks
    return freeze_lm, k if k is not None else recorded.get("vision_trainable_blocks", -1)


def apply_freeze(model: CasaModel, freeze_lm: bool, vision_trainable_blocks: int) -> None:
    """`freeze_lm`: everything of the LM but fusion layers; `vision_trainable_blocks=k`:
    the encoder frozen except its last k blocks (and what follows them)."""
    fusion = {id(p) for p in model.fusion_parameters()}
    for n, p in model.named_parameters():
        if not n.startswith("vision."):
            p.requires_grad_(not freeze_lm or id(p) in fusion)
    model.vision.freeze_encoder(vision_trainable_blocks)


def make_optimizer(model: CasaModel, cfg: TrainConfig, new_names: set[str]) -> torch.optim.AdamW:
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "new" if n in new_names else "pretrained"
        decay = p.dim() >= 2
        groups.setdefault((kind, decay), []).append(p)
    params = [{"params": ps, "lr": cfg.lr_new if kind == "new" else cfg.lr_pretrained,
               "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{kind}{'' if decay else '_nodecay'}"}
              for (kind, decay), ps in sorted(groups.items())]
    if not params:
        raise ValueError("train: every parameter is frozen; nothing to train")
    return torch.optim.AdamW(params, betas=cfg.betas)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


# ------------------------------------------------------------------ loss
def count_targets(docs) -> int:
    return sum(sum(d.targets[1:]) for d in docs)


# ------------------------------------------------------------------ RNG
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _tokenizer(cfg: TrainConfig, ckpt):
    """The config's tokenizer directory, else the one saved in the checkpoint / `init`, else bytes."""
    from casa.pretrained.tokenizer import load_tokenizer

    if cfg.tokenizer:
        return HFTokenizer(cfg.tokenizer)
    for d in filter(None, (ckpt, cfg.init)):
        try:
            return load_tokenizer(d)
        except FileNotFoundError:
            pass
    return ByteTokenizer()


# --------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, *, resume=None, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = setup_distributed(torch.device(kind).type)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if kind == "cuda" else kind)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.out = Path(cfg.out_dir)
        torch.manual_seed(cfg.seed)

        ckpt = None
        if resume:
            ckpt = latest_checkpoint(self.out) if resume is True else Path(resume)
            if ckpt is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {str(self.out / 'checkpoints')!r}")
            cfg_init = dataclasses.replace(cfg, init=str(ckpt), lm_init=None)
            self.model, _ = build_model(model_cfg, cfg_init)
            state = load_state(ckpt)
            pretrained = set(state["pretrained"])
        else:
            self.model, pretrained = build_model(model_cfg, cfg)
            state = None
        self.model_cfg = self.model.config
        self.pretrained = pretrained
        self.tokenizer = _tokenizer(cfg, ckpt)
        if self.tokenizer.vocab_size > self.model_cfg.lm.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but model.lm.vocab_size is "
                             f"{self.model_cfg.lm.vocab_size}")
        source = ckpt or cfg.init
        settings = dict(processor_settings(source) if source else PROCESSOR_DEFAULTS)
        settings.update({k: getattr(cfg, k) for k in PROCESSOR_DEFAULTS if getattr(cfg, k) is not None})
        settings["image_prefix"] = settings["image_prefix"] or None
        self.processor = Processor(self.tokenizer, self.model_cfg.vision, gist=settings["gist"],
                                   gist_token=settings["gist_token"], image_prefix=settings["image_prefix"])
        diff = make_difficulty(cfg.difficulty)
        self.source = make_source(cfg.data, seed=cfg.seed, difficulty=diff, skip_bad=cfg.skip_bad_samples)
        self.packer = Packer(self.source, self.processor, text_tokens=cfg.text_tokens,
                             image_tokens=cfg.image_tokens, splice_images=self.model_cfg.fusion.variant == "insertion",
                             skip_bad=cfg.skip_bad_samples)

        apply_freeze(self.model, *freeze_policy(cfg))
        self.model.to(self.device).train()
        self.raw = self.model
        if self.dist.world > 1:
            self._wrap()
        self.optimizer = make_optimizer(self.raw, cfg, new_parameter_names(self.raw, pretrained))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step, self.position, self.history, self.evals = 0, 0, [], []
        if state is not None:
            self._restore(state)
        self._stop = None

    # ----------------------------------------------------- distribution
    def _wrap(self):
        if self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # blocks return (hidden, image tokens); the image tokens may be a view, never modified in place
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            for block in self.raw.blocks:
                fully_shard(block)
            fully_shard(self.raw)
            self.model = self.raw
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.raw, device_ids=ids, find_unused_parameters=self.cfg.find_unused_parameters)

    def _full_state(self):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.raw, options=opts), get_optimizer_state_dict(self.raw, self.optimizer,
                                                                                       options=opts)

    def _restore(self, state: dict):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(self.raw, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.position = state["step"], state["position"]
        self.history, self.evals = state["history"], state.get("evals", [])
        self.packer.skipped = state.get("skipped", 0)
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])

    def save(self) -> Path | None:
        model_state, optim_state = self._full_state()
        rngs = [rng_state()]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            dist.all_gather_object(rngs, rng_state())
        path = None
        if self.dist.main:
            model = self.raw
            if self.cfg.distributed == "fsdp" and self.dist.world > 1:
                model = CasaModel(self.model_cfg)
                model.load_state_dict(model_state)
            state = {"optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "step": self.step,
                     "position": self.position, "history": self.history, "evals": self.evals, "rng": rngs,
                     "skipped": self.packer.skipped,  # the source's own skips are recounted on load
                     "pretrained": sorted(self.pretrained),
                     "train_config": dataclasses.asdict(self.cfg)}
            path = save_checkpoint(self.out, self.step, model, state, tokenizer=self.tokenizer,
                                   processor=self.processor,
                                   keep_last=self.cfg.keep_last, extra={"train": dataclasses.asdict(self.cfg)})
        if self.dist.world > 1:
            dist.barrier()
        return path

    # ---------------------------------------------------------- signals
    def _on_signal(self, signum, frame):
        if self._stop is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self._stop = signum
        self.log(f"\ncaught {signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    # ---------------------------------------------------------- logging
    def log(self, text: str, *, end: str = "\n") -> None:
        if self.dist.main and not self.quiet:
            print(text, end=end, file=sys.stderr, flush=True)

    # ------------------------------------------------------------- train
    def train_step(self, packs) -> float:
        """One optimizer step on `world * grad_accum` packs; returns the mean token loss."""
        mine = packs[self.dist.rank:: self.dist.world]
        n_targets = max(1, sum(count_targets(p.docs) for p in packs))
        scale = self.dist.world / n_targets
        total = torch.zeros(1, device=self.device)
        for i, pack in enumerate(mine):
            batch = pack_row(pack.docs).to(self.device)
            last = i == len(mine) - 1
            sync = self.model.no_sync() if (not last and hasattr(self.model, "no_sync")) else nullcontext()
            if self.cfg.distributed == "fsdp" and self.dist.world > 1:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    logits = self.model(batch, backend=self.cfg.backend)
                loss, _ = loss_sum(logits, batch)
                (loss * scale).backward()
            total += loss.detach()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.raw.parameters() if p.grad is not None],
                                           self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(_all_sum(total, self.dist)) / n_targets

    def fit(self, *, stop_after: int | None = None) -> dict:
        """Train to `cfg.steps` (or `stop_after` more steps); returns a summary."""
        cfg = self.cfg
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            (self.out / "train_config.json").write_text(json.dumps(
                {"model": self.model_cfg.to_dict(), "train": dataclasses.asdict(cfg)}, indent=2))
        per_step = self.dist.world * cfg.grad_accum
        packs = self.packer.packs(self.position)
        t0, tokens, interrupted, end = time.perf_counter(), 0, None, cfg.steps
        if stop_after is not None:
            end = min(end, self.step + stop_after)
        try:
            while self.step < end:
                step_packs = [next(packs) for _ in range(per_step)]
                loss = self.train_step(step_packs)
                self.step += 1
                self.position = step_packs[-1].end
                tokens += sum(len(d.ids) for p in step_packs for d in p.docs)
                self.history.append({"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]})
                if self.step % cfg.log_every == 0 or self.step == end:
                    rate = tokens / (time.perf_counter() - t0)
                    self._progress(loss, rate)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                stop = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
                if float(_all_sum(stop, self.dist)) > 0:
                    interrupted = self._stop or signal.SIGTERM
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self.save()
            path = self.save()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
        if sys.stderr.isatty():
            self.log("")
        if interrupted:
            self.log(f"interrupted at step {self.step}; checkpoint saved, continue with --resume")
        return {"step": self.step, "checkpoint": str(path) if path else None,
                "interrupted": signal.Signals(interrupted).name if interrupted else None,
                "skipped": self.skipped, "seconds": time.perf_counter() - t0}

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far: unreadable JSONL lines + samples the packer rejected."""
        return getattr(self.source, "skipped", 0) + self.packer.skipped

    def _progress(self, loss: float, rate: float) -> None:
        cfg, width = self.cfg, 24
        done = int(width * self.step / cfg.steps)
        bar = "#" * done + "." * (width - done)
        line = f"[{bar}] step {self.step}/{cfg.steps} | loss {loss:.4f} | {rate:,.0f} tok/s"
        if self.skipped:
            line += f" | skipped {self.skipped}"
        tty = sys.stderr.isatty()
        self.log(("\r" if tty else "") + line, end="" if tty else "\n")

    def evaluate(self) -> dict:
        from casa.eval.synthetic import eval_samples_for, evaluate

        samples = eval_samples_for(self.cfg, n=self.cfg.eval_samples)
        self.raw.eval()
        try:
            result = evaluate(self.raw, self.processor, samples, backend=self.cfg.backend)
        finally:
            self.raw.train()
        entry = {"step": self.step, **{t: r["score"] for t, r in result["tasks"].items()}}
        self.evals.append(entry)
        self.log(("\n" if sys.stderr.isatty() else "") + "eval " +
                 " | ".join(f"{k} {v:.3f}" for k, v in entry.items() if k != "step"))
        return result


def train(model_cfg: ModelConfig, cfg: TrainConfig, *, resume=None, quiet: bool = False) -> dict:
    trainer = Trainer(model_cfg, cfg, resume=resume, quiet=quiet)
    try:
        return trainer.fit()
    finally:
        if trainer.dist.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
