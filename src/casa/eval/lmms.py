"""lmms-eval model plugin: `lmms-eval --model casa --model_args pretrained=DIR`.

Registered through lmms-eval's `lmms_eval.models` entry point (pyproject:
`casa = "casa.eval.lmms:manifest"`), which lmms-eval's model registry loads at
start-up; no fork, no file copied into lmms-eval. Install with the `lmms`
extra.

Design decisions:
- A "simple" lmms-eval model (`is_simple = True`): each request carries the
  task's prompt text and a `doc_to_visual` callable; the images come first in
  the user turn, then the prompt, through the model's own processor and chat
  template (as `casa.eval.stdbench` does).
- `generate_until` decodes greedily (`casa.eval.decode.greedy_decode`), up to
  `batch_size` prompts together (requests with the same `max_new_tokens`,
  in their order; a prompt's answer is the one it gets alone, as that
  module tests), honouring `max_new_tokens` and cutting at the first
  `until` string;
  `loglikelihood` sums the log-probabilities of the continuation tokens after
  the prompt and reports whether each was the argmax.
- The module imports without lmms-eval (the base class then is `object`), so
  its logic is testable anywhere; only `manifest()` needs lmms-eval.
"""

from __future__ import annotations

import torch

try:  # pragma: no cover - depends on the environment
    from lmms_eval.api.model import lmms as _Base
except Exception:  # noqa: BLE001 - lmms-eval absent or broken (it needs torchvision)
    _Base = object

__all__ = ["MODEL_ID", "Casa", "manifest"]

MODEL_ID = "casa"


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest for `--model casa`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="casa.eval.lmms.Casa")


class Casa(_Base):
    """The lmms-eval model `casa`: a casa model directory (`pretrained=DIR`) answering lmms-eval requests."""

    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str | None = None, batch_size: int = 1,
                 max_new_tokens: int = 128, backend: str = "auto", **kwargs):
        if _Base is not object:
            super().__init__()
        from casa.pretrained.directory import load

        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype) if dtype \
            else None
        if int(batch_size) < 1:
            raise ValueError(f"casa (lmms-eval): batch_size={batch_size!r}: must be >= 1")
        # a model directory, or a training run (its latest checkpoint): `load` resolves either
        self.loaded = load(pretrained, dtype=dt, device=device)
        self.model, self.tokenizer, self.processor = self.loaded
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.backend = backend
        if not hasattr(self, "task_dict"):
            self.task_dict = {}

    # lmms-eval's distributed bookkeeping, for the object fallback
    @property
    def rank(self) -> int:
        return getattr(self, "_rank", 0)

    @property
    def world_size(self) -> int:
        return getattr(self, "_world_size", 1)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        return [v.convert("RGB") if hasattr(v, "convert") else v for v in visuals if v is not None]

    def _encode(self, context: str, visuals: list, answer: str):
        parts = [{"type": "image", "image": v} for v in visuals] + [{"type": "text", "text": context}]
        enc = self.processor.encode({"messages": [{"role": "user", "content": parts},
                                                  {"role": "assistant", "content": answer or "-"}]})
        return enc

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, one per request (in order), each cut at its first `until` string;
        up to `batch_size` prompts with the same `max_new_tokens` decoded together."""
        from casa.eval.decode import greedy_decode

        pending = []  # (request index, prompt, max_new_tokens, until)
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            enc = self._encode(context, self._visuals(doc_to_visual, doc_id, task, split), "")
            until = gen_kwargs.get("until") or []
            pending.append((i, enc.prefix(enc.turns[0][0]), int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                            [until] if isinstance(until, str) else list(until)))
        out: list[str | None] = [None] * len(pending)
        while pending:
            n = pending[0][2]
            group = [p for p in pending if p[2] == n][: self.batch_size_per_gpu]
            taken = {p[0] for p in group}
            pending = [p for p in pending if p[0] not in taken]
            answers = greedy_decode(self.model, [p[1] for p in group], self.processor, max_new_tokens=n,
                                    backend=self.backend)
            for (i, _, _, until), ids in zip(group, answers):
                text = self.tokenizer.decode(ids)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                out[i] = text.strip()
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Per request: (sum of the continuation's token log-probabilities, whether each was the argmax)."""
        from dataclasses import replace

        from casa.data import stack_rows

        out = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            continuation = doc_to_target(self.task_dict[task][split][doc_id]) if callable(doc_to_target) \
                else doc_to_target
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            enc = self._encode(context, visuals, "")
            start = enc.turns[0][0]
            prompt = enc.prefix(start)
            target = self.tokenizer.encode(str(continuation))
            full = replace(prompt, ids=prompt.ids + target, targets=[False] * (start + len(target)))
            device = next(self.model.parameters()).device
            batch = stack_rows([full], self.processor.tok.pad_id).to(device)
            logits = self.model.eval()(replace(batch, loss_mask=None), backend=self.backend)[0].float()
            logp = torch.log_softmax(logits[start - 1: start - 1 + len(target)], dim=-1)
            tgt = torch.tensor(target, device=logp.device)
            out.append((float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("casa: multi-round generation is not supported by this plugin")
