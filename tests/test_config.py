"""ChatGLMConfig: config.json round trips, presets, and clear errors for values we cannot run."""

import json

import pytest

from glm6b.config import PRESETS, ChatGLMConfig, ConfigError
from helpers import GOLDEN


def test_golden_config_json_round_trips():
    data = json.loads((GOLDEN / "config.json").read_text(encoding="utf-8"))
    config = ChatGLMConfig.from_json_file(GOLDEN / "config.json")
    assert config.num_layers == 3 and config.bos_token_id == 804 and config.tie_word_embeddings
    written = config.to_dict()
    for key, value in data.items():  # every key of the file survives, unknown ones (auto_map) included
        assert written[key] == value, key


def test_glm_6b_preset_is_the_real_shape():
    config = ChatGLMConfig.from_name("glm_6b")
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_attention_heads,
            config.inner_hidden_size) == (130528, 4096, 28, 32, 16384)
    assert (config.bos_token_id, config.eos_token_id, config.mask_token_id, config.gmask_token_id,
            config.pad_token_id) == (130004, 130005, 130000, 130001, 3)
    assert set(PRESETS) >= {"glm_6b", "tiny"}


@pytest.mark.parametrize("field, value, message", [
    ("position_encoding_2d", False, "2D rotary"),
    ("quantization_bit", 3, "0 \\(float weights\\), 4 or 8"),
    ("quantization_embeddings", True, "false when quantization_bit is 0"),
    ("num_attention_heads", 5, "multiple of num_attention_heads"),
    ("bos_token_id", 10**6, "token id in"),
    ("pre_seq_len", 0, "positive integer"),
])
def test_values_we_cannot_run_are_clear_errors(field, value, message):
    with pytest.raises(ConfigError, match=rf"'{field}'.*{message}|{message}"):
        ChatGLMConfig.from_name("tiny", **{field: value})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown model preset 'big'.*glm_6b"):
        ChatGLMConfig.from_name("big")
