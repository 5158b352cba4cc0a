"""Reading and writing checkpoints: HuggingFace folders (hf.py), MindSpore / MindFormers `.ckpt` files (mindspore.py)."""
