"""`CasaForConditionalGeneration`: a `CasaModel` with the surface transformers
users reach for: `from_pretrained`, `save_pretrained`, `generate`, `.device`,
`.dtype`, and `chat()` for multi-turn conversations.

Design decisions:
- A subclass that adds no parameter and no state but `processor`: it is a
  `CasaModel` wherever one is expected (`Session`, `Chat`, training,
  `casa.save_pretrained`), and its state dict is casa's.
- `from_pretrained` takes a model directory or a training run (its latest
  readable checkpoint) and keeps the directory's processor on the model
  (`model.processor`, None for a directory saved without a tokenizer), as
  transformers keeps a generation config: `generate` stops at its stop tokens
  by default and `chat()` renders with it.
- `generate` is the cached path of `Session`, nothing else: each row is fed
  (text, then each image group at its insertion point: `inference.generate.feed`)
  into a fresh `Session` and sampled with `inference.generate.generate`, so it
  gives the tokens a `Session` or `Chat` gives for the same input (tested).
  Rows are decoded one after another, each in its own stream (a batch is a
  convenience, not a speed-up). Arguments keep transformers' names
  (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`,
  `eos_token_id`, `streamer`); like transformers it returns each row's prompt
  followed by the new tokens, rows right-padded with the pad id.
- A streamer is a callable taking each new token id, or an object with
  transformers' streamer protocol (`put(ids)`, first the prompt, then each new
  token; `end()`), so `transformers.TextStreamer(processor, skip_prompt=True)`
  works: the processor decodes as a transformers tokenizer does.
- `forward` takes a core `Batch` (as `CasaModel`) or the processor's keyword
  inputs (`model(**inputs)`), and returns the logits tensor, as `CasaModel`.
"""

from __future__ import annotations

import torch

from casa.core.batch import Batch
from casa.core.model import CasaModel
from casa.data.inputs import ModelInputs
from casa.inference.generate import Chat, Sampling, feed, generate
from casa.inference.session import Session
from casa.pretrained.directory import from_pretrained, load_processor, save_pretrained
from casa.pretrained.runs import resolve_model_dir
from casa.pretrained.tokenizer import has_tokenizer

__all__ = ["CasaForConditionalGeneration"]


class CasaForConditionalGeneration(CasaModel):
    """A `CasaModel` with `from_pretrained`, `save_pretrained`, `generate`, `chat` (module docstring).

    Build one from a config (`CasaForConditionalGeneration(ModelConfig(...))`, random weights) or
    load one (`CasaForConditionalGeneration.from_pretrained(dir)`).
    """

    processor = None  # the directory's data.Processor (from_pretrained), or None

    # ------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None, device=None) -> "CasaForConditionalGeneration":
        """Load a casa model directory or a training run's latest checkpoint (eval mode; the stored
        dtype unless `dtype`), with its processor when the directory has a tokenizer."""
        path = resolve_model_dir(path)
        model = from_pretrained(path, dtype=dtype, device=device, model_class=cls)
        model.processor = load_processor(path) if has_tokenizer(path) else None
        return model

    def save_pretrained(self, path, *, processor=None, overwrite: bool = False, max_shard_size="2GB"):
        """Write the model and its processor (`processor`, else `self.processor`; its tokenizer and
        settings) as one casa model directory (`casa.save_pretrained`); returns the path."""
        processor = processor if processor is not None else self.processor
        tokenizer = processor.tok if processor is not None else None
        return save_pretrained(self, path, tokenizer=tokenizer, processor=processor, overwrite=overwrite,
                               max_shard_size=max_shard_size)

    @property
    def device(self) -> torch.device:
        """Where the parameters are."""
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.embed.weight.dtype

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Batch | None = None, *, backend: str = "auto", return_hidden: bool = False,
                input_ids: torch.Tensor | None = None, **inputs):
        """Logits `[B, T, vocab]` of a core `Batch`, or of the processor's inputs given as keywords
        (`input_ids [B, T]`, `attention_mask`, `pixel_values`, `insertion_points`, `image_rows`)."""
        if batch is None:
            if input_ids is None:
                raise ValueError("forward: give a casa Batch or the processor's inputs (model(**inputs))")
            batch = ModelInputs(input_ids=input_ids, **inputs).batch()
        return super().forward(batch, backend=backend, return_hidden=return_hidden)

    # ----------------------------------------------------------------- generate
    def _stop_tokens(self, eos_token_id) -> tuple[int, ...]:
        if eos_token_id is None:
            return tuple(sorted(self.processor.stop_ids)) if self.processor is not None else ()
        return (int(eos_token_id),) if isinstance(eos_token_id, int) else tuple(int(t) for t in eos_token_id)

    def _pad_id(self) -> int:
        return self.processor.tok.pad_id if self.processor is not None else 0

    @torch.inference_mode()
    def generate(self, input_ids=None, *, attention_mask: torch.Tensor | None = None, pixel_values=None,
                 insertion_points: torch.Tensor | None = None, image_rows: torch.Tensor | None = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id=None, streamer=None, generator: torch.Generator | None = None,
                 logits_processors=(), history=None, cache_dtype: torch.dtype | None = None, decode: str = "auto",
                 backend: str = "auto") -> torch.Tensor:
        """Prompt(s) plus new tokens, through `Session`'s cached path (module docstring).

        Args:
            input_ids: `[B, T]` or `[T]` long (or the processor's `ModelInputs` as the first argument);
                `attention_mask [B, T]` marks each row's tokens (right padding).
            pixel_values: the images, `[N, C, S, S]` or a list of items; `insertion_points [N]` long,
                the text index before which each sits; `image_rows [N]` long (default row 0).
            max_new_tokens: most tokens to add per row; `eos_token_id` (an id or ids; default the
                processor's stop tokens) ends a row early, itself included in the output.
            do_sample: sample with `temperature`, `top_k`, `top_p` (and `generator`), else greedy.
            streamer: a callable taking each new token id, or a transformers-style streamer.
            logits_processors: `inference.generate` processors (`RepetitionPenalty`, ...).
            history, cache_dtype, decode, backend: as `Session`.
        Returns:
            `[B, T_b + new_b]` long: each row's prompt (its unpadded tokens) then its new tokens,
            right-padded with the pad id to the longest row.
        """
        if isinstance(input_ids, dict):  # generate(inputs) as well as generate(**inputs)
            given = dict(input_ids)
            input_ids = given.pop("input_ids")
            attention_mask = given.pop("attention_mask", attention_mask)
            pixel_values = given.pop("pixel_values", pixel_values)
            insertion_points = given.pop("insertion_points", insertion_points)
            image_rows = given.pop("image_rows", image_rows)
        rows = self._rows(input_ids, attention_mask, pixel_values, insertion_points, image_rows)
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0,
                            stop_tokens=self._stop_tokens(eos_token_id))
        if streamer is not None and len(rows) > 1:
            raise ValueError(f"generate: a streamer follows one row; got a batch of {len(rows)}")
        out = []
        for ids, images, points in rows:
            session = Session(self, history=history, backend=backend, cache_dtype=cache_dtype, decode=decode)
            prompt = feed(session, ids, images, points)
            on_token = _on_token(streamer, ids)
            gen = generate(session, prompt, sampling=sampling, processors=logits_processors, generator=generator,
                           commit=False, on_token=on_token)
            if streamer is not None and hasattr(streamer, "end"):
                streamer.end()
            out.append(ids + gen.tokens)
        width = max(len(r) for r in out)
        sequences = torch.full((len(out), width), self._pad_id(), dtype=torch.long)
        for b, r in enumerate(out):
            sequences[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return sequences.to(input_ids.device if torch.is_tensor(input_ids) else self.device)

    def _rows(self, input_ids, attention_mask, pixel_values, insertion_points, image_rows):
        """[(ids, images, points)] per row, checked; the error says what to pass."""
        if input_ids is None:
            raise ValueError("generate: give input_ids ([B, T] token ids), e.g. model.generate(**processor("
                             "text=..., images=...)) or model.generate(**processor.apply_chat_template(messages, "
                             "add_generation_prompt=True, tokenize=True))")
        ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"generate: input_ids of shape {tuple(ids.shape)}; expected [B, T] token ids, T >= 1")
        lengths = [ids.shape[1]] * len(ids) if attention_mask is None else \
            [int(n) for n in torch.as_tensor(attention_mask).sum(-1).tolist()]
        n_images = 0 if pixel_values is None else len(pixel_values)
        if n_images and insertion_points is None:
            raise ValueError("generate: pixel_values without insertion_points (the text index before which each "
                             "image goes); the processor gives both")
        points = torch.as_tensor(insertion_points if n_images else [], dtype=torch.long).cpu()
        owners = torch.zeros(n_images, dtype=torch.long) if image_rows is None else \
            torch.as_tensor(image_rows, dtype=torch.long).cpu()
        if len(points) != n_images or len(owners) != n_images:
            raise ValueError(f"generate: {n_images} images, {len(points)} insertion_points, {len(owners)} "
                             "image_rows; give one of each per image")
        out = []
        for b, n in enumerate(lengths):
            if n < 1:
                raise ValueError(f"generate: row {b} has no tokens (attention_mask is all zero)")
            mine = (owners == b).nonzero().flatten().tolist()
            images = [pixel_values[i] for i in mine]
            out.append((ids[b, :n].tolist(), images, points[mine].tolist()))
        return out

    # --------------------------------------------------------------------- chat
    def chat(self, processor=None, *, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None, logits_processors=(),
             history=None, cache_dtype: torch.dtype | None = None, decode: str = "auto") -> Chat:
        """A multi-turn `inference.Chat` over a fresh `Session` of this model, rendered with `processor`
        (default: the model's own): `chat.ask("...", images=[...]).text`."""
        processor = processor if processor is not None else self.processor
        if processor is None:
            raise ValueError("chat: this model has no processor (it was built in Python or saved without a "
                             "tokenizer); pass one: model.chat(casa.load_processor(dir))")
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=top_k if do_sample else 0, top_p=top_p if do_sample else 1.0)
        session = Session(self, history=history, cache_dtype=cache_dtype, decode=decode)
        return Chat(session, processor, sampling=sampling, processors=logits_processors, generator=generator)


def _on_token(streamer, prompt: list[int]):
    """The per-token callback of `generate` for a streamer (module docstring); None without one."""
    if streamer is None:
        return None
    if hasattr(streamer, "put"):  # transformers' protocol: the prompt first, then each token
        streamer.put(torch.tensor([prompt], dtype=torch.long))
        return lambda tok: streamer.put(torch.tensor([tok], dtype=torch.long))
    if callable(streamer):
        return streamer
    raise TypeError(f"generate: streamer={type(streamer).__name__}: expected a callable taking each token id, "
                    "or an object with put(ids) and end() (a transformers streamer)")
