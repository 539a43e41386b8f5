"""`casa build`: a CASA VLM from a local Hugging Face LM and vision encoder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="build a CASA VLM from a local HF LM and vision encoder directory")
    b.add_argument("--lm", required=True, help="HF causal-LM directory (Llama, Qwen2, Mistral, Qwen2.5-VL)")
    b.add_argument("--vision", default=None,
                   help="SigLIP / CLIP (vision) or Qwen2.5-VL directory (default: the built-in ViT, from scratch)")
    b.add_argument("--out", required=True, help="casa model directory to write")
    b.add_argument("--fusion", default="casa", help="fusion variant (casa, casa_shared, ca, insertion, ...)")
    b.add_argument("--placement", default="parallel", choices=["parallel", "before", "replace"])
    b.add_argument("--every", type=int, default=1, help="a fusion layer in every n-th block")
    b.add_argument("--layers", default=None, help="explicit comma-separated fusion blocks (wins over --every)")
    b.add_argument("--no-init-from-sa", action="store_true", help="fresh fusion layers instead of SA copies")
    b.add_argument("--train-lm", action="store_true", help="keep the LM trainable (default: frozen)")
    b.add_argument("--vision-trainable-blocks", type=int, default=2,
                   help="train the last k vision blocks (-1: the whole encoder)")
    b.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the LM checkpoint's)")
    b.add_argument("--token-reduction", default="none", choices=["none", "pool", "unshuffle"])
    b.add_argument("--reduction-factor", type=int, default=2)
    b.add_argument("--image-size", type=int, default=None, help="input side (Qwen2.5-VL: a multiple of 28)")
    b.add_argument("--tokenizer", default="lm", help="'lm' (the LM directory's), 'byte', or a tokenizer directory")
    b.add_argument("--image-prefix", default=None, help="token before each image (default: from the template)")
    b.add_argument("--gist-token", default=None, help="token after each image (default: from the template)")
    b.add_argument("--no-gist", action="store_true", help="no token after images")
    b.add_argument("--max-shard-size", default="2GB", help="shard model.safetensors above this size")
    b.set_defaults(func=run)


def run(args) -> int:
    from casa.pretrained.build import BuildConfig, run

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    cfg = BuildConfig(lm=args.lm, vision=args.vision, fusion=args.fusion, placement=args.placement, every=args.every,
                      layers=layers, init_from_sa=not args.no_init_from_sa, freeze_lm=not args.train_lm,
                      vision_trainable_blocks=args.vision_trainable_blocks, dtype=args.dtype,
                      token_reduction=args.token_reduction, reduction_factor=args.reduction_factor,
                      image_size=args.image_size, tokenizer=args.tokenizer, image_prefix=args.image_prefix,
                      gist_token=args.gist_token, gist=not args.no_gist)
    run(cfg, args.out, max_shard_size=args.max_shard_size)
    return 0
