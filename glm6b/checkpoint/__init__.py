"""Reading and writing checkpoints: HuggingFace folders (hf.py), MindSpore / MindFormers `.ckpt` files
(mindspore.py) and MindFormers' sharded sets of them (mindspore_shards.py)."""
