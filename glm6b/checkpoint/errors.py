"""The error every checkpoint reader raises (HF folders, MindSpore `.ckpt` files)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the one-line message names the file and what was expected."""
