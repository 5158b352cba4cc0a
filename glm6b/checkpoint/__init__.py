"""Reading and writing checkpoints: HuggingFace folders (hf.py)."""
