"""The model against the reference's golden outputs (forward, batch, loss, P-tuning, KV cache)."""

import pytest
import torch

from glm6b import load_model
from glm6b.model import InputError, KVCache, build_mask_and_positions
from helpers import GOLDEN, assert_close_rel, golden_cases, golden_tensor


@pytest.fixture(scope="module")
def ptuning_model():
    return load_model(GOLDEN, dtype=torch.float32, device="cpu",
                      ptuning_checkpoint=GOLDEN / "prefix_encoder.safetensors", pre_seq_len=4, prefix_projection=False)


def test_parameter_names_and_shapes_match_reference(model):
    facts = golden_cases()["model_facts"]
    ours = {name: list(p.shape) for name, p in model.state_dict().items()}
    for name, shape in facts["param_shapes"].items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer the reference stores; we recompute it
        assert ours[name] == shape, name
    assert set(ours) == {n for n in facts["param_shapes"] if not n.endswith("inv_freq")}
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_inverse_frequencies_are_fp16_rounded():
    from glm6b.model import rotary_inv_freq

    expected = torch.tensor(golden_cases()["model_facts"]["inv_freq_layer0"])
    assert torch.equal(rotary_inv_freq(2 * len(expected)), expected)


def test_forward_single(model):
    case = golden_cases()["forward_single"]
    ids = torch.tensor(case["input_ids"])
    mask, positions = build_mask_and_positions(ids, model.config)
    assert torch.equal(mask, golden_tensor(case["attention_mask"]))
    assert torch.equal(positions, golden_tensor(case["position_ids"]))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert_close_rel(out.logits, golden_tensor(case["logits"]), what="logits")
    hidden = torch.stack(out.hidden_states)[:, 0]  # [L+1, T, H]
    assert_close_rel(hidden, golden_tensor(case["hidden_states"]), what="hidden states")


def test_forward_pair_training_layout(model):
    case = golden_cases()["forward_pair"]
    ids = torch.tensor(case["input_ids"])
    mask, positions = build_mask_and_positions(ids, model.config)
    assert torch.equal(mask, golden_tensor(case["attention_mask"]))
    assert torch.equal(positions, golden_tensor(case["position_ids"]))
    with torch.no_grad():
        logits = model(ids).logits
    assert_close_rel(logits, golden_tensor(case["logits"]), what="logits")


def test_forward_left_padded_batch_all_positions(model):
    case = golden_cases()["forward_batch"]
    with torch.no_grad():
        logits = model(torch.tensor(case["input_ids"]), attention_mask=golden_tensor(case["attention_mask"]),
                       position_ids=golden_tensor(case["position_ids"])).logits
    # Padding positions included: fully masked rows attend uniformly, as in the reference.
    assert_close_rel(logits, golden_tensor(case["logits"]), what="batch logits")


def test_padding_mask_2d_builds_the_tokenizer_mask_and_positions(model):
    case = golden_cases()["forward_batch"]
    ids = torch.tensor(case["input_ids"])
    is_pad = golden_tensor(case["is_pad"])
    mask, positions = build_mask_and_positions(ids, model.config, padding_mask=~is_pad)
    assert torch.equal(mask, golden_tensor(case["attention_mask"]))
    assert torch.equal(positions, golden_tensor(case["position_ids"]))


def test_training_loss(model):
    case = golden_cases()["train_adgen"]
    with torch.no_grad():
        out = model(torch.tensor(case["input_ids"]), labels=torch.tensor(case["labels"]))
    assert abs(out.loss.item() - case["loss"]) <= 1e-5 * abs(case["loss"])
    assert_close_rel(out.logits, golden_tensor(case["logits"]), what="train logits")
    for row, expected in enumerate(case["loss_per_example"]):
        with torch.no_grad():
            loss = model(torch.tensor(case["input_ids"][row:row + 1]), labels=torch.tensor(case["labels"][row:row + 1])).loss
        assert abs(loss.item() - expected) <= 1e-5 * abs(expected)


def test_kv_cache_decode_equals_full_recomputation(model):
    """Feed a left-padded batch token by token through the cache; every step's logits must equal
    a full forward over the whole sequence so far (with the reference's carried mask/positions)."""
    case = golden_cases()["forward_batch"]
    ids = torch.tensor(case["input_ids"])
    mask = golden_tensor(case["attention_mask"])
    positions = golden_tensor(case["position_ids"])
    batch, prompt_len = ids.shape
    steps = 6
    cache = KVCache(model.config, batch, prompt_len + steps, torch.float32, "cpu")
    with torch.no_grad():
        logits = model(ids, position_ids=positions, attention_mask=mask, kv_cache=cache).logits[:, -1]
        seq, full_mask, full_pos = ids, mask, positions
        for _ in range(steps):
            next_ids = logits.argmax(-1, keepdim=True)
            # Grow the mask and positions as the reference's generation does (spec 4.8).
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[..., :1])], dim=3)
            new_row = full_mask[:, :, -1:].clone()
            new_row[..., -1] = False
            full_mask = torch.cat([full_mask, new_row], dim=2)
            new_pos = full_pos[:, :, -1:] + torch.tensor([0, 1])[None, :, None]
            full_pos = torch.cat([full_pos, new_pos], dim=2)
            seq = torch.cat([seq, next_ids], dim=1)
            logits = model(next_ids, position_ids=new_pos, attention_mask=full_mask[:, :, -1:],
                           kv_cache=cache).logits[:, -1]
            reference = model(seq, position_ids=full_pos, attention_mask=full_mask).logits[:, -1]
            assert_close_rel(logits, reference, what=f"step at length {seq.shape[1]}")


def test_ptuning_prefix_encoder(ptuning_model):
    case = golden_cases()["ptuning"]
    m = ptuning_model
    ids = torch.tensor(case["single"]["input_ids"])
    cache = KVCache(m.config, 1, m.config.pre_seq_len + ids.shape[1], torch.float32, "cpu")
    with torch.no_grad():
        logits = m(ids, kv_cache=cache).logits
        past = m.transformer.prefix_past(1, torch.float32)[0]  # [2, B, nh, P, d]
    assert_close_rel(logits, golden_tensor(case["single"]["logits"]), what="p-tuning logits")
    present_key = cache.keys[0, :, :, :cache.length].permute(2, 0, 1, 3)  # [P+T, B, nh, d]
    present_value = cache.values[0, :, :, :cache.length].permute(2, 0, 1, 3)
    assert_close_rel(present_key, golden_tensor(case["single"]["present_key_layer0"]), what="present key")
    assert_close_rel(present_value, golden_tensor(case["single"]["present_value_layer0"]), what="present value")
    assert_close_rel(past.permute(0, 3, 1, 2, 4), golden_tensor(case["prompt_past_key_values_layer0"]),
                     what="prefix past")

    batch = golden_cases()["forward_batch"]
    inputs = dict(attention_mask=golden_tensor(batch["attention_mask"]), position_ids=golden_tensor(batch["position_ids"]))
    with torch.no_grad():
        logits = m(torch.tensor(batch["input_ids"]), **inputs).logits
    assert_close_rel(logits, golden_tensor(case["batch"]["logits"]), what="p-tuning batch logits")
    sequences = m.generate(torch.tensor(batch["input_ids"]), **inputs,
                           max_new_tokens=case["generate_batch_greedy"]["max_new_tokens"], do_sample=False)
    assert sequences.tolist() == case["generate_batch_greedy"]["sequences"]


def test_ptuning_loss_and_gradients(ptuning_model):
    case = golden_cases()["ptuning"]
    rows = golden_cases()["train_adgen"]
    m = ptuning_model
    m.zero_grad()
    out = m(torch.tensor(rows["input_ids"]), labels=torch.tensor(rows["labels"]))  # eval mode: no prefix dropout
    out.loss.backward()
    assert abs(out.loss.item() - case["train_loss"]) <= 1e-5 * abs(case["train_loss"])
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == case["param_names"]
    for name, tensor_name in case["train_grads"].items():
        assert_close_rel(dict(m.named_parameters())[name].grad, golden_tensor(tensor_name), rel=1e-4, what=name)
    m.zero_grad()


def test_missing_special_tokens_give_a_clear_error(model):
    with pytest.raises(InputError, match=r"row 0 has no <sop> token \(id 804\)"):
        model(torch.tensor([[5, 53, 162]]))
    with pytest.raises(InputError, match=r"no \[gMASK\] \(id 801\) or \[MASK\]"):
        model(torch.tensor([[5, 53, 162, 804]]))


def test_gradient_checkpointing_gives_same_gradients(model):
    rows = golden_cases()["train_adgen"]
    ids, labels = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])
    grads = []
    for checkpointing in (False, True):
        model.train()
        model.transformer.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(ids, labels=labels).loss.backward()
        grads.append(model.transformer.layers[0].attention.query_key_value.weight.grad.clone())
    model.transformer.gradient_checkpointing = False
    model.zero_grad()
    model.eval()
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(model, dtype):
    case = golden_cases()["forward_single"]
    half = load_model(GOLDEN, dtype=dtype, device="cpu")
    with torch.no_grad():
        logits = half(torch.tensor(case["input_ids"])).logits
    assert logits.dtype == dtype
    golden = golden_tensor(case["logits"])
    # Low-precision arithmetic: the argmax should mostly survive and errors stay small.
    assert (logits.float() - golden).abs().max() < 0.1 * golden.abs().max()
    assert (logits.float().argmax(-1) == golden.argmax(-1)).float().mean() > 0.9
