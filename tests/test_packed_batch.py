"""Batch questions as one packed sequence (assistant/packed_batch.py). The answers themselves are compared with
one-at-a-time and left-padded answers in test_model.py (`layout` "packed"); here the parts: the prompt's
row-by-row attention against SDPA under the full packed mask, finished rows leaving the steps, and the check
that refuses an attention which ignores the layout."""

import torch
from helpers import image_question, random_image, tiny_config

from assistant.model.builder import build_model
from assistant.cpu.attention import use_cpu_grouped_sdpa
from assistant.inference.engine import Engine
from assistant.inference.generation import GenerationConfig
from assistant.inference.packed_batch import PackedBatch, decode_packed
from assistant.inference.shared_prefix import shared_prefix_groups


def sample_batch() -> PackedBatch:
    # rows 0, 2, 3 share a 5-token prefix; row 1 shares nothing (a prefix of all but its last token)
    ids = [[1, 2, 3, 4, 5, 10, 11], [7, 8, 9], [1, 2, 3, 4, 5, 12, 13, 14, 15], [1, 2, 3, 4, 5, 16]]
    pixels = [None] * 4
    return PackedBatch(ids, shared_prefix_groups(ids, pixels, image_token_id=99))


def test_prompt_attention_row_by_row_equals_sdpa_under_the_packed_mask():
    packed = sample_batch()
    tokens = packed.input_ids.shape[1]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 5, 6, 2, 5, 6, 7, 8, 5]]
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 6, tokens, 8), torch.randn(1, 2, tokens, 8), torch.randn(1, 2, tokens, 8)
    layout = packed.prompt_attention_layout()
    ours = layout.attend(query, key, value, scaling=0.3)
    full = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=packed.prompt_mask(),
                                                            scale=0.3, enable_gqa=True).transpose(1, 2)
    assert layout.calls == 1
    assert torch.allclose(ours, full, atol=1e-6)
    # the mask itself: row 2's question sees its prefix and its own earlier tokens, not row 0's question
    mask = packed.prompt_mask()[0, 0]
    row2_last = packed.last[2]
    assert mask[row2_last].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13]


def test_a_step_sees_its_rows_prompt_and_earlier_tokens_only():
    packed = sample_batch()
    packed.step([0, 1, 2, 3])
    mask, positions = packed.step([0, 2])  # rows 1 and 3 finished
    assert positions.tolist() == [[8, 10]]
    keys = mask[0, 0]
    assert keys.shape == (2, packed.input_ids.shape[1] + 6)
    assert keys[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 7, 8, 15, 19]  # prefix, question, its 2 tokens
    assert keys[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 17, 20]


def test_finished_rows_are_no_longer_computed(tiny_llm_dir, monkeypatch):
    torch.manual_seed(0)
    model, processor = build_model(tiny_config(tiny_llm_dir))
    use_cpu_grouped_sdpa(model.llm)
    engine = Engine(model, processor)
    questions = [image_question(t) for t in ("what?", "how many are there?", "is it red?")]
    images = [[random_image(5)] for _ in questions]
    config = GenerationConfig(max_new_tokens=6)
    free = engine.answer_batch(questions, images, config)
    ids = [processor.encode(q, im).input_ids for q, im in zip(questions, images)]
    pixels = [processor.preprocess_images(im) for im in images]
    packed = PackedBatch(ids, shared_prefix_groups(ids, pixels, processor.image_token_id))
    features = engine.encode_images(images[0])
    first = next(decode_packed(model, packed, features, config, engine.end_ids)).tolist()
    assert first[0] not in first[1:]  # row 0's first token can end row 0 alone
    fed = []
    original = model.llm.forward
    monkeypatch.setattr(model.llm, "forward",
                        lambda *a, **k: fed.append(k["input_ids"].shape[1] if "input_ids" in k else 0) or original(*a, **k))
    packed = PackedBatch(ids, shared_prefix_groups(ids, pixels, processor.image_token_id))
    steps = list(decode_packed(model, packed, features, config, engine.end_ids | {first[0]}))
    assert fed[0] == 0 and set(fed[1:]) == {2}  # the prompt (embeddings), then rows 1 and 2 only
    for row in (1, 2):  # the other rows' answers are as without row 0's early end
        assert processor.tokenizer.decode([int(s[row]) for s in steps], skip_special_tokens=True).strip() == free[row]


def test_an_attention_that_ignores_the_layout_is_refused(tiny_llm_dir):
    torch.manual_seed(0)
    model, processor = build_model(tiny_config(tiny_llm_dir))  # transformers' SDPA: it has no packed layout
    ids = [[1, 2, 3, 4], [1, 2, 3, 5]]
    packed = PackedBatch(ids, shared_prefix_groups(ids, [None, None], processor.image_token_id))
    try:
        next(decode_packed(model, packed, None, GenerationConfig(max_new_tokens=2), {0}))
    except RuntimeError as e:
        assert "used its layout" in str(e)
    else:
        raise AssertionError("a prompt whose attention ignored the packed layout was decoded")


@torch.inference_mode()
def test_the_prompt_gathered_into_padded_rows_steps_as_the_packed_sequence_does(tiny_llm_dir):
    # what compiled batch steps start from (their graph takes left-padded rows)
    from assistant.inference.generation import position_ids_from_mask
    from assistant.inference.packed_batch import prefill_packed

    torch.manual_seed(0)
    model, processor = build_model(tiny_config(tiny_llm_dir))
    use_cpu_grouped_sdpa(model.llm)
    questions = [image_question(t) for t in ("what?", "how many shapes are there?")] + [image_question("and here?")]
    images = [[random_image(5)], [random_image(5)], [random_image(6)]]
    ids = [processor.encode(q, im).input_ids for q, im in zip(questions, images)]
    pixels = [processor.preprocess_images(im) for im in images]
    packed = PackedBatch(ids, shared_prefix_groups(ids, pixels, processor.image_token_id))
    features = model.encode_images(torch.cat([pixels[0], pixels[2]]))
    logits, cache, layout = prefill_packed(model, packed, features)
    padded, mask = layout.padded_cache(cache, model.llm.config), layout.row_mask
    assert mask.sum(-1).tolist() == [len(row) for row in ids]
    tokens = logits.argmax(-1)
    step_mask, positions = packed.step([0, 1, 2])
    in_sequence = model.llm(input_ids=tokens[None], attention_mask=step_mask, position_ids=positions,
                            cache=cache).logits[0]
    in_rows = model.llm(input_ids=tokens[:, None], attention_mask=torch.cat([mask, torch.ones(3, 1).long()], 1),
                        position_ids=position_ids_from_mask(mask)[:, -1:] + 1, cache=padded).logits[:, -1]
    assert torch.allclose(in_sequence, in_rows, atol=1e-4)
