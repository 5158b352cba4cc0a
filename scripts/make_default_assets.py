#!/usr/bin/env python
"""Regenerate glm6b's built-in default assets (glm6b/assets/default/) from their seed.

    python scripts/make_default_assets.py            # rewrite the shipped files in place
    python scripts/make_default_assets.py --out DIR  # write them elsewhere (e.g. to compare)

Writes ice_text.model + tokenizer_config.json (a small unigram tokenizer with ChatGLM-6B's special
layout, trained on the train split and a few chat lines), config.json (the matching small model) and
adgen/train.json + adgen/dev.json (ADGEN-style JSON lines from glm6b.sample_data). Deterministic:
the same arguments give byte-identical files (same sentencepiece version).
"""

from __future__ import annotations

import argparse
import sys

from glm6b import sample_data
from glm6b import tokenizer_builder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(sample_data.DEFAULT_ASSETS), help="output folder (default: the package's)")
    parser.add_argument("--seed", type=int, default=sample_data.DEFAULT_SEED)
    parser.add_argument("--num-train", type=int, default=sample_data.DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-dev", type=int, default=sample_data.DEFAULT_NUM_DEV)
    parser.add_argument("--vocab-size", type=int, default=tokenizer_builder.DEFAULT_VOCAB_SIZE,
                        help="SentencePiece vocabulary size before the 344 appended pieces")
    args = parser.parse_args(argv)
    paths = sample_data.build_default_assets(args.out, seed=args.seed, num_train=args.num_train,
                                             num_dev=args.num_dev, vocab_size=args.vocab_size)
    for name, path in paths.items():
        print(f"{name:17s} {path}  ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
