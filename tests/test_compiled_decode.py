"""Compiled decode steps (assistant/compiled_decode.py) on a tiny random Llama: the compiled step gives the
logits of the same int8 weight-only model run eagerly, hands the session's KV cache back as eager steps
leave it, serves a two-turn chat through the engine, and steps aside for what it cannot take."""

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from assistant import decode_attention
from assistant.builder import build_model
from assistant.compiled_decode import CompiledDecoder, Int8WeightOnlyLinear, RescoredLMHead, rescored_head
from assistant.engine import ChatSession, Engine
from assistant.generation import GenerationConfig
from helpers import random_image, tiny_config


@pytest.fixture(scope="module")
def model_and_processor(tiny_llm_dir_gentle):
    model, processor = build_model(tiny_config(tiny_llm_dir_gentle))
    return model.eval(), processor


@pytest.fixture(scope="module")
def decoder(model_and_processor):
    decoder = CompiledDecoder(model_and_processor[0].llm, max_length=256).start()
    assert decoder.wait(timeout=600), decoder.error
    return decoder


def test_int8_weight_only_linear_is_close_to_the_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48)
    x = torch.randn(5, 96)
    y = Int8WeightOnlyLinear(linear, dtype=torch.float32)(x)
    reference = linear(x)
    assert ((y - reference).norm() / reference.norm()).item() < 0.01


@torch.inference_mode()
def test_the_rescored_lm_head_picks_what_the_int8_head_picks():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 1024, bias=False)
    int8_head = Int8WeightOnlyLinear(linear)
    head = rescored_head(int8_head, linear.weight)
    assert isinstance(head, RescoredLMHead)
    hidden = torch.randn(32, 64, dtype=torch.bfloat16)
    ours, exact = head(hidden).float(), int8_head(hidden).float()
    rounding = 0.02 * exact.abs().max().item()  # the top values are recomputed from the int8 rows in fp32
    picked = exact.gather(-1, ours.argmax(-1, keepdim=True))  # the int8 head's best, or a tie within rounding
    assert bool((picked >= exact.max(-1, keepdim=True).values - rounding).all())
    top = exact.topk(4, dim=-1).indices  # well inside the int4 pass's top 16: recomputed exactly
    assert torch.allclose(ours.gather(-1, top), exact.gather(-1, top), atol=rounding)
    assert not torch.equal(ours, exact)  # the rest comes from the int4 pass
    odd = torch.nn.Linear(64, 1000, bias=False)  # int4 packing wants rows in multiples of 16: int8 stays
    assert isinstance(rescored_head(Int8WeightOnlyLinear(odd), odd.weight), Int8WeightOnlyLinear)


@torch.inference_mode()
def test_compiled_steps_match_eager_steps_and_hand_back_the_cache(decoder):
    llm = decoder.llm  # the same weights, run eagerly: only the compiled kernels differ
    # the steps' attention is our kernel (decode_attention.cpp), the eager reference's is SDPA
    assert decode_attention.supports(llm.model.layers[0].self_attn), decode_attention.error
    prompt = torch.tensor([[1, 17, 305, 9, 44, 12, 8, 900]])
    tokens = [31, 502, 77, 3, 18, 260]
    eager_cache = DynamicCache(config=llm.config)
    eager = [llm(input_ids=prompt, past_key_values=eager_cache, use_cache=True).logits[:, -1]]
    for t in tokens:
        eager.append(llm(input_ids=torch.tensor([[t]]), past_key_values=eager_cache, use_cache=True).logits[:, -1])

    cache = DynamicCache(config=llm.config)
    llm(input_ids=prompt, past_key_values=cache, use_cache=True)
    with decoder.steps(cache, torch.ones_like(prompt), max_new_tokens=len(tokens)) as step:
        assert step is not None
        compiled = [step(torch.tensor([t])) for t in tokens]
    for ours, reference in zip(compiled, eager[1:]):
        assert torch.allclose(ours.float(), reference.float(), atol=0.05 * reference.abs().max().item())
    assert cache.get_seq_length() == prompt.shape[1] + len(tokens)
    for mine, theirs in zip(cache.layers, eager_cache.layers):
        assert torch.allclose(mine.keys.float(), theirs.keys.float(), atol=0.05 * theirs.keys.abs().max().item())
    # the cache continues eagerly where the compiled steps stopped
    after = llm(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True).logits[:, -1]
    reference = llm(input_ids=torch.tensor([[5]]), past_key_values=eager_cache, use_cache=True).logits[:, -1]
    assert torch.allclose(after.float(), reference.float(), atol=0.05 * reference.abs().max().item())


@torch.inference_mode()
def test_a_reply_reads_nothing_an_earlier_longer_one_left_in_the_static_cache(decoder):
    """Between replies only the static cache's position counts go back to 0 (zeroing all of it took 5 ms a
    reply): whatever lies past the new reply's length must never reach its attention."""
    llm = decoder.llm
    long_prompt = torch.arange(100, 140)[None]
    cache = DynamicCache(config=llm.config)
    llm(input_ids=long_prompt, past_key_values=cache, use_cache=True)
    with decoder.steps(cache, torch.ones_like(long_prompt), 8) as step:
        for t in range(8):
            step(torch.tensor([200 + t]))
    for layer in decoder.cache.layers:  # and garbage everywhere, to be sure nothing past the length is read
        layer.keys.fill_(50.0)
        layer.values.fill_(-50.0)
    prompt = torch.tensor([[1, 17, 305, 9]])
    tokens = [31, 502, 77]
    eager_cache = DynamicCache(config=llm.config)
    llm(input_ids=prompt, past_key_values=eager_cache, use_cache=True)
    eager = [llm(input_ids=torch.tensor([[t]]), past_key_values=eager_cache, use_cache=True).logits[:, -1]
             for t in tokens]
    cache = DynamicCache(config=llm.config)
    llm(input_ids=prompt, past_key_values=cache, use_cache=True)
    with decoder.steps(cache, torch.ones_like(prompt), max_new_tokens=len(tokens)) as step:
        compiled = [step(torch.tensor([t])) for t in tokens]
    for ours, reference in zip(compiled, eager):
        assert torch.allclose(ours.float(), reference.float(), atol=0.05 * reference.abs().max().item())


def test_steps_step_aside_for_what_they_cannot_take(decoder):
    llm = decoder.llm
    prompt = torch.tensor([[1, 17, 305], [1, 18, 306]])
    cache = DynamicCache(config=llm.config)
    with torch.inference_mode():
        llm(input_ids=prompt, past_key_values=cache, use_cache=True)
    with decoder.steps(cache, torch.ones_like(prompt), 8) as step:
        assert step is None  # a batch of two
    single = DynamicCache(config=llm.config)
    with torch.inference_mode():
        llm(input_ids=prompt[:1], past_key_values=single, use_cache=True)
    with decoder.steps(single, torch.ones_like(prompt[:1]), 400) as step:
        assert step is None  # longer than the static cache (256)
    with decoder.steps(single, torch.tensor([[0, 1, 1]]), 8) as step:
        assert step is None  # a padded row
    with decoder.steps(single, torch.ones_like(prompt[:1]), 8) as first:
        assert first is not None
        with decoder.steps(single, torch.ones_like(prompt[:1]), 8) as second:
            assert second is None  # one static cache: a second reply at the same time steps eagerly
    assert single.get_seq_length() == 3  # nothing stepped, nothing added


def test_engine_chat_uses_the_compiled_steps_across_turns(model_and_processor, decoder):
    model, processor = model_and_processor
    engine = Engine(model, processor)
    calls = []
    compiled = decoder._compiled

    def counting(*args):
        calls.append(args[2])
        return compiled(*args)

    decoder._compiled, model.compiled_decoder = counting, decoder
    try:
        session = ChatSession()
        session.add_user_message("What is in the image?", [random_image(1)])
        engine.chat(session, GenerationConfig(max_new_tokens=12))
        first_turn = len(calls)
        session.add_user_message("And what colour is it?")
        engine.chat(session, GenerationConfig(max_new_tokens=12))
    finally:
        decoder._compiled = compiled
        del model.compiled_decoder
    assert first_turn > 0 and len(calls) > first_turn
    assert calls[first_turn] > calls[first_turn - 1]  # the second turn continues after the first
    # the session's cache holds exactly what the engine says it holds, ready for a third turn
    assert session.cache.get_seq_length() == len(session.cached_keys)


def test_a_failed_compile_leaves_eager_steps_and_says_why(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    decoder = CompiledDecoder(model.llm, max_length=64)

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(decoder, "_warm_up", no_compiler)
    with pytest.warns(RuntimeWarning, match="decoding stays eager"):
        assert decoder.start().wait(timeout=60) is False
    assert "no C++ compiler" in decoder.error
    engine = Engine(model, processor)
    model.compiled_decoder = decoder
    try:
        session = ChatSession()
        session.add_user_message("Hello?")
        assert isinstance(engine.chat(session, GenerationConfig(max_new_tokens=4)), str)
    finally:
        del model.compiled_decoder
    assert session.cache.get_seq_length() == len(session.cached_keys)



def test_two_models_of_one_shape_each_decode_with_their_own_weights():
    """A second model of the same shapes (a fine-tune of the first) must decode with its own weights: Dynamo
    keeps compiled code per function and inductor's disk cache keys frozen weights by shape only, so both
    once handed the second decoder the first one's weights."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    first = LlamaForCausalLM(config).eval()
    second = copy.deepcopy(first)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(-1.5)
    prompt, token = torch.tensor([[1, 17, 305, 9]]), torch.tensor([[31]])
    outputs = []
    for llm in (first, second):
        decoder = CompiledDecoder(llm, max_length=256).start()
        assert decoder.wait(timeout=600), decoder.error
        with torch.inference_mode():
            eager_cache, cache = DynamicCache(config=config), DynamicCache(config=config)
            decoder.llm(input_ids=prompt, past_key_values=eager_cache, use_cache=True)
            decoder.llm(input_ids=prompt, past_key_values=cache, use_cache=True)
            reference = decoder.llm(input_ids=token, past_key_values=eager_cache, use_cache=True).logits[:, -1].float()
            with decoder.steps(cache, torch.ones_like(prompt), max_new_tokens=2) as step:
                ours = step(token[0]).float()
        assert torch.allclose(ours, reference, atol=0.05 * reference.abs().max().item())
        outputs.append(reference)
    assert not torch.allclose(outputs[0], outputs[1], atol=0.5 * outputs[0].abs().max().item())


def test_compiled_steps_that_disagree_with_eager_steps_stay_off(model_and_processor, monkeypatch):
    def miscompile(fn, **kwargs):
        return lambda *args: -fn(*args)

    monkeypatch.setattr(torch, "compile", miscompile)
    decoder = CompiledDecoder(model_and_processor[0].llm, max_length=64)
    with pytest.warns(RuntimeWarning, match="decoding stays eager"):
        assert decoder.start().wait(timeout=120) is False
    assert "disagrees with the eager step" in decoder.error
