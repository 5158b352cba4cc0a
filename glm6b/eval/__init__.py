"""Evaluation: BLEU-4 / ROUGE metrics and the generate-and-score loop."""
