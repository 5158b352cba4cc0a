"""LoRA on a quantized base (QLoRA-style): exact backward through the int8/int4 layers, training, and an
adapter that is an ordinary PEFT adapter for the float base too."""

import json

import pytest
import torch
from helpers import GOLDEN, golden_cases, write_adgen_sample

from glm6b.api import quantize_folder
from glm6b.checkpoint.adapters import load_adapter
from glm6b.checkpoint.hf import load_model
from glm6b.config import DataConfig, LoadConfig, LoraConfig, TrainingConfig
from glm6b.data.adgen import JsonlDataset
from glm6b.quant.linear import QuantizedLinear
from glm6b.tokenizer import load_tokenizer
from glm6b.train.frozen_linear import use_fast_frozen_backward
from glm6b.train.trainer import Trainer

torch.set_num_threads(1)


@pytest.mark.parametrize("bits", [8, 4])
def test_backward_through_a_quantized_linear_is_grad_times_its_dequantized_weight(bits):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(torch.nn.Linear(64, 96, dtype=torch.bfloat16), bits)
    assert use_fast_frozen_backward(layer, float_linears=False) == 1
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected = (grad.double().reshape(-1, 96) @ layer.dequantized_weight().double()).reshape(3, 5, 64)
    assert torch.allclose(x.grad.double(), expected, rtol=2 ** -7, atol=1e-3)
    with torch.no_grad():  # the forward is the layer's own int kernel, unchanged
        assert torch.equal(layer(x), QuantizedLinear.forward(layer, x))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_adgen_sample(tmp_path_factory.mktemp("qlora") / "train.json")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_qlora_trains_and_its_adapter_loads_on_the_float_base(tmp_path, data, quantize):
    from peft import PeftModel

    tok = load_tokenizer(GOLDEN)
    dc = DataConfig(max_source_length=24, max_target_length=20)
    trainer = Trainer(model_args=LoadConfig(load_checkpoint=str(GOLDEN), dtype="bfloat16", quantize=quantize),
                      tokenizer=tok, method="lora", data_config=dc, lora_config=LoraConfig(r=8, lora_dropout=0.0),
                      train_dataset=JsonlDataset(data, tok, dc),
                      args=TrainingConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                                             learning_rate=1e-2, save_steps=None, tensorboard=False, disable_tqdm=True,
                                             logging_steps=1, gradient_checkpointing=True))
    out = trainer.train()
    base = trainer.model.base_model.model
    assert isinstance(base.transformer.layers[0].attention.query_key_value.base_layer, QuantizedLinear)
    assert out.losses[-1] < out.losses[0] - 0.3, out.losses
    # An ordinary PEFT adapter: its tensors are named as for a float base.
    adapter = out.final_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["query_key_value"]
    ids = torch.tensor(golden_cases()["train_adgen"]["input_ids"])
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits.float()
        requantized = load_adapter(load_model(GOLDEN, dtype=torch.bfloat16, quantize=quantize), adapter)
        assert torch.equal(requantized(input_ids=ids).logits.float(), trained)
        on_float = PeftModel.from_pretrained(load_model(GOLDEN, dtype=torch.float32), str(adapter)).eval()
        float_logits = on_float(input_ids=ids).logits
        plain = load_model(GOLDEN, dtype=torch.float32)(input_ids=ids).logits
    # On the float base the adapter changes the output the way it changed the quantized model's.
    assert (float_logits - trained).abs().mean() < (plain - trained).abs().mean()


def test_qlora_on_a_thudm_layout_quantized_folder(tmp_path, data):
    folder = quantize_folder(GOLDEN, tmp_path / "int4", "int4")
    assert json.loads((folder / "config.json").read_text())["quantization_bit"] == 4
    tok = load_tokenizer(GOLDEN)
    dc = DataConfig(max_source_length=24, max_target_length=20)
    trainer = Trainer(model_args=LoadConfig(load_checkpoint=str(folder), dtype="bfloat16"), tokenizer=tok,
                      method="lora", data_config=dc, lora_config=LoraConfig(r=4, lora_dropout=0.0),
                      train_dataset=JsonlDataset(data, tok, dc),
                      args=TrainingConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                                             learning_rate=1e-2, save_steps=None, tensorboard=False, disable_tqdm=True))
    out = trainer.train()
    assert out.losses[-1] < out.losses[0]
    assert (out.final_dir / "adapter_model.safetensors").is_file()
