"""Weight-only int8/int4 quantization in THUDM's layout (see `glm6b.quant.linear` and `glm6b.quant.thudm`)."""
