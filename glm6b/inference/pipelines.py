"""The text-generation pipeline: (model, tokenizer) -> a callable over prompts (`glm6b.pipeline` builds one
from a model name or folder, see glm6b.auto).

    pipe = TextGenerationPipeline(model, tokenizer, max_new_tokens=64, do_sample=False)
    pipe("你好")          # [{'text_generation_text': ['...']}]
    pipe(["a", "b"])      # one dict per prompt

The output format is MindFormers' TextGenerationPipeline's. Prompts go to the model as they are
(no chat template: use glm6b.inference.chat for conversations), in left-padded batches. The module is named
`pipelines` (as in transformers) so that the name `glm6b.pipeline` can stay the function: importing
a submodule `glm6b.pipeline` would rebind that package attribute to the module.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import check_tokenizer_matches
from .generation import generate, make_generation_config

OUTPUT_KEY = "text_generation_text"


class TextGenerationPipeline:
    """Generate continuations of prompts in batches.

    Args:
        model: a ChatGLMForConditionalGeneration.
        tokenizer: its ChatGLMTokenizer.
        batch_size: prompts per generate call.
        **gen: default GenerationConfig fields (max_new_tokens, do_sample, top_p, seed, ...). Without
            max_length/max_new_tokens, prompt + continuation are limited to the model's
            max_sequence_length (2048).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, **gen):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_tokenizer_matches(tokenizer, model.config)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.gen = {"max_length": model.config.max_sequence_length, **gen}
        make_generation_config(**self.gen)  # unknown or invalid options fail here, not at the first call

    def __call__(self, inputs: str | Sequence[str], batch_size: int | None = None, **gen_overrides) -> list[dict]:
        """Generate for one prompt or a list of prompts.

        Args:
            inputs: a prompt or a list of prompts.
            batch_size: overrides the pipeline's batch size for this call.
            **gen_overrides: GenerationConfig fields for this call only.

        Returns:
            One dict per prompt, in order: {'text_generation_text': [text, ...]} with
            num_return_sequences texts, each the decoded continuation (prompt excluded, special
            tokens skipped, stripped).

        Raises:
            ValueError: an input that is not a string, or an invalid generation option.
        """
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"pipeline input {i} must be a string, got {type(text).__name__}")
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = {**self.gen, **gen_overrides}
        gen.setdefault("allowed_vocab_size", len(self.tokenizer))  # padding rows of the vocab have no text
        config = make_generation_config(**gen)
        n = config.num_return_sequences

        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = self.tokenizer(chunk, padding=True, return_tensors="pt").to(self.model.device)
            sequences = generate(self.model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                 generation_config=config, tokenizer=self.tokenizer)
            continuations = sequences[:, batch["input_ids"].shape[1]:].tolist()
            decoded = [t.strip() for t in self.tokenizer.batch_decode(continuations, skip_special_tokens=True)]
            for i in range(len(chunk)):
                results.append({OUTPUT_KEY: decoded[i * n:(i + 1) * n]})
        return results
