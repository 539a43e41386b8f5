"""The image side of casa: preprocessing, encoders (built-in ViT, transformers
towers), token reduction and the projector into the language model's width.

Design decisions:
- Depends only on `casa.config` and `casa.weights`; the core model imports
  it, never the reverse.
- Every encoder honours one contract, `pixels [N, C, S, S] -> [N, g*g, width]`
  (see `tower.py`), so the tower, token reduction and projector do not care
  which encoder runs.
"""

from casa.vision.hf import (
           HF_MODEL_TYPES,
           HFVisionEncoder,
           load_vision_weights,
           vision_config_from_hf,
)
from casa.vision.preprocess import check_pixels, preprocess
from casa.vision.tower import Projector, VisionTower, reduce_tokens, reduced_width
from casa.vision.vit import ViT

__all__ = ["HF_MODEL_TYPES", "HFVisionEncoder", "Projector", "ViT", "VisionTower", "check_pixels",
           "load_vision_weights", "preprocess", "reduce_tokens", "reduced_width", "vision_config_from_hf"]
