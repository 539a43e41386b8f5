"""casa the way Hugging Face users already work: a model class with
`from_pretrained` / `save_pretrained` / `generate` (`model.py`), and export of
a casa model directory to a transformers one (`export.py`, with the
self-contained remote-code files of `remote/`; `export_dir.py` recognises
an export without importing torch, for `casa export`'s checks).

Design decisions:
- Nothing here is a second implementation of casa: the model class is a
  `CasaModel` (every function that takes one takes it), its `generate` feeds
  a `Session` and samples with `inference.generate`, exactly as `Chat` does;
  the processor's transformers-style calls live on `data.Processor` itself.
- The one exception is the exported modeling file, which must run where casa
  is not installed: it restates casa's forward in plain torch +
  transformers, and tests hold it to casa's tokens (tests/test_export.py).
- Modules are imported by their full name (`casa.hub.model`); `casa` itself
  re-exports the public names lazily.
"""

__all__: list[str] = []
