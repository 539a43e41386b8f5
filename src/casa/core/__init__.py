"""The model core: the interleaved batch, windows and masks, attention
backends, the decoder with its fusion layers, and the loss.

Design decisions:
- Modules are layered inside the package: `layout` (the mask rule) <-
  `attention` (backends) <- `lm` (decoder layers) <- `fusion` <- `model`;
  `batch` builds layouts, `loss` reads batches.
- Nothing here knows about tokenizers, files or inference state: `core`
  imports only `casa.config` and `casa.vision`.
"""

__all__: list[str] = []
