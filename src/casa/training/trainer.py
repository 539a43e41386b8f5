"""The trainer behind `casa train`: one loop for 1 process, DDP and FSDP2.

Its neighbours: `training.config` (TrainConfig, config files, `--set`),
`training.distributed` (ranks, collectives), `training.optim` (parameter
groups, AdamW, schedule), `training.checkpoint` (writing and reading
checkpoints), `pretrained.freeze` (which parameters train), `core.loss`
(which tokens are targets).

Design decisions:
- Data: one deterministic stream of packs (`data.Packer`) from a sample
  position. Each optimizer step takes `world * grad_accum` consecutive packs;
  rank `r` runs packs `r, r + world, ...`. Every rank walks the whole stream,
  so all ranks agree on the position (one integer in the checkpoint) and on
  the number of target tokens of the step.
- Loss: summed cross-entropy over the step's target tokens divided by their
  global count (times `world`, which DDP/FSDP averaging divides back out), so
  every target token weighs the same however packs fall on ranks and micro
  steps: 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches. Which tokens
  are targets is `core.loss.target_mask`'s rule, counted with it too.
- Resume is exact: model, optimizer, scheduler, RNG of every rank, data
  position and loss history are restored from the latest readable checkpoint
  (a damaged newer one is skipped with a warning, see `pretrained.runs`).
- A resumed run keeps its own settings (`resumed_config`: the train config
  saved in the checkpoint); only `--set` overrides change them, each printed,
  and a change of the schedule says what it does at the resumed step. The
  optimizer's hyperparameters (peak learning rates, weight decay, betas) are
  then taken from that config, not from the saved optimizer state, so an
  override applies; unchanged, they are the same numbers bit for bit.
- RNG states are stored in a JSON-able form (lists of integers, tensors), so
  that the checkpoint needs no pickle (`training.checkpoint`).
- Everything the user can get wrong is checked before the model is built:
  `out_dir` is a directory (or can be made one), the `difficulty` table is
  valid, the device exists, the
  attention backend runs on it; a fresh run refuses an `out_dir` that already
  holds another run's checkpoints (keep-last pruning would mix the two runs
  and `casa eval RUN` would read the wrong one): `--resume` continues it.
- SIGINT / SIGTERM set a flag; the step finishes, ranks agree (all-reduce),
  a checkpoint is saved and the trainer returns. A second signal stops at
  once: a save in progress is abandoned whole (the checkpoint is atomic) and
  the log says which checkpoint is the latest.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from casa.config import ConfigError, ModelConfig, build
from casa.core.batch import Batch
from casa.core.loss import loss_sum, target_mask
from casa.core.model import CasaModel
from casa.data import Packer, Processor, make_source, pack_row
from casa.data.tasks import Difficulty
from casa.data.tasks import difficulty as make_difficulty
from casa.files import atomic_file, check_output_dir, read_json
from casa.pretrained.directory import PROCESSOR_DEFAULTS, processor_settings
from casa.pretrained.freeze import apply_freeze, resolve_policy
from casa.pretrained.runs import STATE, check_checkpoint, latest_checkpoint, list_checkpoints
from casa.pretrained.tokenizer import ByteTokenizer, HFTokenizer
from casa.training.checkpoint import load_state, save_checkpoint
from casa.training.config import TrainConfig, load_config
from casa.training.distributed import (
    all_gather_objects,
    all_sum,
    barrier,
    setup_distributed,
    shutdown,
)
from casa.training.optim import lr_lambda, make_optimizer, make_scheduler, new_parameter_names

# TrainConfig and load_config live in training.config; they are re-exported here for existing callers.
__all__ = ["TrainConfig", "Trainer", "build_model", "checkpoint_to_resume", "count_targets", "load_config",
           "resolve_tokenizer", "resumed_config", "rng_state", "set_rng_state", "train"]


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


def resolve_tokenizer(cfg: TrainConfig, ckpt):
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


def count_targets(docs) -> int:
    """Target tokens of a pack's documents, by `core.loss.target_mask` (text only: no image is read)."""
    ids = torch.tensor([[i for d in docs for i in d.ids]], dtype=torch.long)
    mask = torch.tensor([[t for d in docs for t in d.targets]], dtype=torch.bool)
    return int(target_mask(Batch(ids, doc_lens=[[len(d.ids) for d in docs]], loss_mask=mask)).sum())


def _check_device(cfg: TrainConfig) -> str:
    """The device kind to train on; a ValueError naming train.device / train.backend if they cannot run here."""
    from casa.core.attention import resolve_backend

    kind = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    kind_name = kind.split(":")[0]
    if kind_name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={cfg.device!r}: CUDA is not available on this machine")
    if kind_name == "cuda" and ":" in kind and int(kind.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"train.device={cfg.device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if kind_name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"train.device={cfg.device!r}: MPS is not available on this machine")
    try:
        resolve_backend(cfg.backend, torch.device(kind))
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"train.backend={cfg.backend!r}: {e}") from None
    return kind


# ------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch, CUDA) as lists of integers and tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    """Restore what `rng_state` returned (also the tuples of checkpoints written by older casa versions)."""
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, m = s // 3600, s // 60 % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


# --------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, *, resume=None, quiet: bool = False):
        """`resume`: True (the latest readable checkpoint of `cfg.out_dir`), a checkpoint path, or None."""
        self.cfg, self.quiet = cfg, quiet
        self.out = check_output_dir(cfg.out_dir, "train.out_dir")
        build(Difficulty, cfg.difficulty, "train.difficulty")
        kind = _check_device(cfg)
        self.dist = setup_distributed(torch.device(kind).type)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if kind == "cuda" else kind)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        torch.manual_seed(cfg.seed)

        ckpt = self._checkpoint_to_resume(resume)
        if ckpt is not None:
            state = load_state(ckpt)
            self.model, _ = build_model(model_cfg, dataclasses.replace(cfg, init=str(ckpt), lm_init=None))
            pretrained = set(state["pretrained"])
            self.log(f"resuming from {ckpt} (step {state['step']})")
        else:
            self.model, pretrained = build_model(model_cfg, cfg)
            state = None
        self.model_cfg = self.model.config
        self.pretrained = pretrained
        self.tokenizer = resolve_tokenizer(cfg, ckpt)
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
                             image_tokens=cfg.image_tokens,
                             splice_images=self.model_cfg.fusion.variant == "insertion" and cfg.insertion_counts_images,
                             memory_tokens=self.model_cfg.fusion.frame_memory, skip_bad=cfg.skip_bad_samples)

        apply_freeze(self.model, resolve_policy(cfg.freeze_lm, cfg.vision_trainable_blocks, init=cfg.init))
        self.model.to(self.device).train()
        self.raw = self.model
        if self.dist.world > 1:
            self._wrap()
        self.optimizer = make_optimizer(self.raw, cfg, new_parameter_names(self.raw, pretrained))
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.step, self.position, self.history, self.evals = 0, 0, [], []
        if state is not None:
            self._restore(state)
        self._stop = None

    def _checkpoint_to_resume(self, resume) -> Path | None:
        if resume:
            return checkpoint_to_resume(self.out, resume)
        found = list_checkpoints(self.out)
        if found:
            raise ValueError(f"train.out_dir {str(self.out)!r} already holds the checkpoints of a run (latest: "
                             f"{found[-1][1].name}); pass --resume to continue it, or choose another out_dir")
        return None

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
        self._apply_hyperparameters()
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])

    def _apply_hyperparameters(self) -> None:
        """Peak learning rates, weight decay and betas from `self.cfg` onto the restored optimizer and
        scheduler (their saved state carries the run's former values); the current learning rate is the
        scheduler's own formula at the restored step, so unchanged settings give the same bits."""
        cfg, f = self.cfg, lr_lambda(self.cfg)
        peaks = []
        for group in self.optimizer.param_groups:
            name = group.get("name", "new")
            peak = cfg.lr_new if name.startswith("new") else cfg.lr_pretrained
            group["initial_lr"], group["betas"] = peak, tuple(cfg.betas)
            group["weight_decay"] = 0.0 if name.endswith("_nodecay") else cfg.weight_decay
            group["lr"] = peak * f(self.scheduler.last_epoch)
            peaks.append(peak)
        self.scheduler.base_lrs = peaks
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part). Returns its path."""
        model_state, optim_state = self._full_state()
        rngs = all_gather_objects(rng_state(), self.dist)
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
        barrier(self.dist)
        return path

    def _save_or_report(self) -> Path | None:
        """`save()`, saying which checkpoint is the latest if a second Ctrl-C abandons it."""
        try:
            return self.save()
        except KeyboardInterrupt:
            latest = list_checkpoints(self.out)
            where = f"the latest checkpoint is {latest[-1][1]}" if latest else "no checkpoint was saved"
            self.log(f"\ninterrupted again while saving step {self.step}: that checkpoint was abandoned whole "
                     f"(nothing half-written); {where}")
            raise

    # ---------------------------------------------------------- signals
    def _on_signal(self, signum, frame):
        if self._stop is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self._stop = signum
        self.log(f"\ncaught {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                 "(press Ctrl-C again to stop at once)")

    # ---------------------------------------------------------- logging
    def log(self, text: str, *, end: str = "\n") -> None:
        """Print on stderr from rank 0, unless quiet."""
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
        return float(all_sum(total, self.dist)) / n_targets

    def fit(self, *, stop_after: int | None = None) -> dict:
        """Train to `cfg.steps` (or `stop_after` more steps); returns a summary."""
        cfg = self.cfg
        handlers = {}
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            with atomic_file(self.out / "train_config.json") as f:
                json.dump({"model": self.model_cfg.to_dict(), "train": dataclasses.asdict(cfg)}, f, indent=2)
        per_step = self.dist.world * cfg.grad_accum
        packs = self.packer.packs(self.position)
        t0, tokens, interrupted, end, first = time.perf_counter(), 0, None, cfg.steps, self.step
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
                    elapsed = time.perf_counter() - t0
                    self._progress(loss, tokens / elapsed, (self.step - first) / elapsed)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                stop = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
                if float(all_sum(stop, self.dist)) > 0:
                    interrupted = self._stop or signal.SIGTERM
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                    self._save_or_report()
            path = self._save_or_report()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
        if sys.stderr.isatty():
            self.log("")
        if interrupted:
            self.log(f"interrupted at step {self.step}; checkpoint saved: {path}; continue with --resume")
        return {"step": self.step, "checkpoint": str(path) if path else None,
                "interrupted": signal.Signals(interrupted).name if interrupted else None,
                "skipped": self.skipped, "seconds": time.perf_counter() - t0}

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far: unreadable JSONL lines + samples the packer rejected."""
        return getattr(self.source, "skipped", 0) + self.packer.skipped

    def _progress(self, loss: float, tok_rate: float, step_rate: float) -> None:
        cfg, width = self.cfg, 24
        done = int(width * self.step / cfg.steps)
        bar = "#" * done + "." * (width - done)
        eta = _duration((cfg.steps - self.step) / step_rate) if step_rate > 0 else "?"
        line = f"[{bar}] step {self.step}/{cfg.steps} | loss {loss:.4f} | {tok_rate:,.0f} tok/s | eta {eta}"
        if self.skipped:
            line += f" | skipped {self.skipped}"
        tty = sys.stderr.isatty()
        self.log(("\r" if tty else "") + line, end="" if tty else "\n")

    def evaluate(self) -> dict:
        """Greedy evaluation on `eval_samples` held-out samples per task; appended to `self.evals`."""
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


# --------------------------------------------------------------- resuming a run as it was configured
SCHEDULE = ("steps", "warmup_steps", "min_lr_ratio", "lr_new", "lr_pretrained")


def checkpoint_to_resume(out_dir, resume) -> Path:
    """The checkpoint `--resume` names: True / "latest": the latest readable one of `out_dir`, else a path."""
    if resume is True or resume == "latest":
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {str(Path(out_dir) / 'checkpoints')!r}")
        return ckpt
    check_checkpoint(resume)
    return Path(resume)


def _saved_train_config(ckpt: Path) -> tuple[dict | None, int | None]:
    """(the train config the run was saved with, its step), from the checkpoint's JSON state, else from
    the run's `train_config.json`; (None, None) when neither holds one (the trainer then names the damage)."""
    try:
        state = read_json(ckpt / STATE)
        if isinstance(state, dict) and isinstance(state.get("train_config"), dict):
            return state["train_config"], state.get("step")
    except (ValueError, OSError):
        pass
    try:
        saved = read_json(ckpt.parent.parent / "train_config.json")
        if isinstance(saved, dict) and isinstance(saved.get("train"), dict):
            return saved["train"], None
    except (ValueError, OSError):
        pass
    return None, None


def resumed_config(ckpt, given: TrainConfig, overrides=(), log=print) -> TrainConfig:
    """The train config a resumed run continues with: the one saved in checkpoint `ckpt`, with `out_dir`
    as given and the `--set` `overrides` applied. Each override that changes a value is logged
    (`steps: 2000 -> 6000`), as is a value of the config file that differs and is not used, and a change
    of the learning-rate schedule says what it does at the resumed step. `model.*` overrides are
    refused: a resumed model is the checkpoint's."""
    ckpt = Path(ckpt)
    model_keys = [o.partition("=")[0].strip() for o in overrides if o.partition("=")[0].strip().startswith("model.")]
    if model_keys:
        raise ConfigError(f"--set {model_keys[0]}: a resumed run's model is its checkpoint's; model settings "
                          "cannot change on --resume (start a new run with train.init=CHECKPOINT instead)")
    saved, step = _saved_train_config(ckpt)
    if saved is None:
        log(f"casa: warning: {str(ckpt)!r} records no train config; resuming with the config as given")
        return given
    saved = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    _, cfg = load_config(None, overrides, base={"train": {**saved, "out_dir": given.out_dir}})
    _, old = load_config(None, (), base={"train": {**saved, "out_dir": given.out_dir}})
    overridden = {o.partition("=")[0].strip().removeprefix("train.") for o in overrides}
    log(f"casa: resuming {str(given.out_dir)!r} with the settings it was trained with (from {str(ckpt)!r})")
    for f in dataclasses.fields(TrainConfig):
        a, b, g = getattr(old, f.name), getattr(cfg, f.name), getattr(given, f.name)
        if f.name in overridden and a != b:
            log(f"casa: --set {f.name}: {a!r} -> {b!r}")
        elif f.name not in overridden and f.name != "out_dir" and g != a:
            log(f"casa: note: the config gives {f.name}={g!r}, the run has {a!r}: the run's value is kept "
                f"(--set {f.name}=... changes it)")
    changed = [k for k in SCHEDULE if getattr(old, k) != getattr(cfg, k)]
    if changed:
        at = step if isinstance(step, int) else 0
        was, now = lr_lambda(old)(at), lr_lambda(cfg)(at)
        log(f"casa: the learning-rate schedule changes ({', '.join(changed)}): warmup {cfg.warmup_steps} steps, "
            f"cosine to step {cfg.steps} (was {old.steps}); at step {at} the learning rate of new parameters goes "
            f"{old.lr_new * was:.3g} -> {cfg.lr_new * now:.3g}")
    return cfg


def train(model_cfg: ModelConfig, cfg: TrainConfig, *, resume=None, quiet: bool = False) -> dict:
    """Build a Trainer and fit it; leaves the process group (if any) at the end. Returns `fit`'s summary."""
    trainer = Trainer(model_cfg, cfg, resume=resume, quiet=quiet)
    try:
        summary = trainer.fit()
    except BaseException:
        shutdown(trainer.dist, wait=False)
        raise
    shutdown(trainer.dist)
    return summary
