"""Inference: generation, chat and the text-generation pipeline."""
