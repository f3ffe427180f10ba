"""Compiled decode steps (assistant/cpu/compiled_decoder.py) on a tiny random Llama: the compiled step gives the
logits of the same int8 weight-only model run eagerly, hands the session's KV cache back as eager steps
leave it, serves a two-turn chat through the engine, and steps aside for what it cannot take."""

import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from assistant.cpu import decode_attention, weight_only
from assistant.cpu.compiled_decoder import CompiledDecoder
from assistant.cpu.weight_only import (Int4WeightOnlyLinear, Int8WeightOnlyLinear, RescoredLMHead, exact_int4_grid,
                                       int4_grid, rescored_head, weight_only_copy)
from assistant.model.builder import build_model
from assistant.inference.engine import ChatSession, Engine
from assistant.inference.runtime import Runtime
from assistant.inference.generation import GenerationConfig
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


@contextlib.contextmanager
def compiled_calls(engine, decoder):
    """`decoder` serving `engine` within the block; yields the list of its compiled steps' arguments."""
    calls, compiled = [], decoder._compiled

    def counting(*args):
        calls.append(args)
        return compiled(*args)

    decoder._compiled, engine.runtime = counting, Runtime(decoder=decoder)
    try:
        yield calls
    finally:
        decoder._compiled, engine.runtime = compiled, Runtime()


def test_engine_chat_uses_the_compiled_steps_across_turns(model_and_processor, decoder):
    model, processor = model_and_processor
    engine = Engine(model, processor)
    with compiled_calls(engine, decoder) as steps:
        session = ChatSession()
        session.add_user_message("What is in the image?", [random_image(1)])
        engine.chat(session, GenerationConfig(max_new_tokens=12))
        first_turn = len(steps)
        session.add_user_message("And what colour is it?")
        engine.chat(session, GenerationConfig(max_new_tokens=12))
    calls = [args[2] for args in steps]  # the lengths attended to
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
    engine = Engine(model, processor, Runtime(decoder=decoder))
    session = ChatSession()
    session.add_user_message("Hello?")
    assert isinstance(engine.chat(session, GenerationConfig(max_new_tokens=4)), str)
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
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        decoder = CompiledDecoder(llm, max_length=256).start()
        assert decoder.wait(timeout=600), decoder.error
        # one graph for every length (not one for the first length, then another)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
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


def test_the_compile_leaves_fx_tracing_to_the_thread_that_makes_the_decoder(monkeypatch):
    """torch.fx's symbolic tracing replaces nn.Module.__call__ for every thread while it runs: inductor's one
    trace must not happen in the compile's thread, beside a model running in another one."""
    import threading

    from torch._inductor.loop_body import InterpreterShim

    InterpreterShim._dummy_gm.cache_clear()
    threads = []
    trace = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda *a, **k: threads.append(threading.current_thread()) or
                        trace(*a, **k))
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    decoder = CompiledDecoder(LlamaForCausalLM(config).eval(), max_length=64).start()
    assert decoder.wait(timeout=600), decoder.error
    assert threads == [threading.main_thread()]


def test_compiled_steps_guard_their_arguments_only():
    from types import SimpleNamespace

    from assistant.cpu.compiled_decoder import guards_on_step_arguments

    names = ["token_ids", "L['valid_length']", "attention_mask", "position_ids", "", "L['self'].cache.layers[0].keys",
             "self", "G['decode_attention'].supports", "L['self'].llm.model.layers[3]"]
    kept = guards_on_step_arguments([SimpleNamespace(name=n) for n in names])
    assert kept == [True, True, True, True, True, False, False, False, False]


def test_compiled_steps_that_disagree_with_eager_steps_stay_off(model_and_processor, monkeypatch):
    def miscompile(fn, **kwargs):
        return lambda *args: -fn(*args)

    monkeypatch.setattr(torch, "compile", miscompile)
    decoder = CompiledDecoder(model_and_processor[0].llm, max_length=64)
    with pytest.warns(RuntimeWarning, match="decoding stays eager"):
        assert decoder.start().wait(timeout=120) is False
    assert "disagrees with the eager step" in decoder.error


# ---- weights that already lie on a 4-bit grid (the bundled SmolLM2 is a Q4_1 GGUF), with a LoRA adapter --------

def snapped_to_int4_grid(module):
    """Every linear layer's weights moved to their nearest 4-bit grid, as a Q4_1 GGUF file's weights lie."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                codes, scale, low = int4_grid(m.weight)
                groups = low[..., None] + scale[..., None] * codes.reshape(*scale.shape, -1).float()
                m.weight.copy_(groups.reshape(m.weight.shape))
    return module


def grid_llama(adapter_on=None):
    """A tiny Llama on a 4-bit grid, with a LoRA adapter (random B, so it changes the outputs) on `adapter_on`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    llm = snapped_to_int4_grid(LlamaForCausalLM(config)).eval()
    if adapter_on is None:
        return llm
    return get_peft_model(llm, LoraConfig(r=4, lora_alpha=8, target_modules=adapter_on, init_lora_weights=False)).eval()


@torch.inference_mode()
def test_int4_weights_on_their_grid_are_taken_as_they_are_with_the_adapter_beside_them():
    torch.manual_seed(0)
    linear = snapped_to_int4_grid(torch.nn.Linear(96, 48))
    assert exact_int4_grid(torch.nn.Linear(96, 48).weight) is None  # ordinary weights are not on a grid
    grid = exact_int4_grid(linear.weight)
    assert grid is not None
    a, b = torch.randn(4, 96) * 0.1, torch.randn(48, 4) * 0.1
    x = torch.randn(5, 96)
    reference = x @ (linear.weight + b @ a).T + linear.bias
    ours = Int4WeightOnlyLinear(linear, grid, (a, b), dtype=torch.float32)(x)
    assert ((ours - reference).norm() / reference.norm()).item() < 1e-5  # exact but for fp32 arithmetic
    in_bf16 = Int4WeightOnlyLinear(linear, grid, (a, b))(x.bfloat16()).float()
    assert ((in_bf16 - reference).norm() / reference.norm()).item() < 0.01
    plain = Int4WeightOnlyLinear(linear, grid, dtype=torch.float32)(x)
    assert torch.allclose(plain, linear(x), atol=1e-4)


@torch.inference_mode()
def test_the_decode_copy_keeps_4_bit_layers_int4_and_their_adapter_where_it_pays(monkeypatch):
    model = grid_llama(adapter_on="all-linear")
    merged = copy.deepcopy(model).merge_and_unload()
    prompt = torch.tensor([[1, 17, 305, 9, 44]])
    reference = merged(input_ids=prompt).logits.float()

    def layers(fast):
        block = fast.model.layers[0]
        return [block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj]

    def close(fast):
        logits = fast(input_ids=prompt).logits.float()
        return ((logits - reference).norm() / reference.norm()).item() < 0.02

    # the tiny layers are below LORA_SIDE_PATH_MIN_WEIGHTS: adapter merged, int8
    fast = weight_only_copy(model, int4=True)
    assert all(type(x) is Int8WeightOnlyLinear for x in layers(fast)) and close(fast)
    monkeypatch.setattr(weight_only, "LORA_SIDE_PATH_MIN_WEIGHTS", 0)  # as for large layers
    fast = weight_only_copy(model, int4=True)
    assert all(type(x) is Int4WeightOnlyLinear and x.lora_a is not None for x in layers(fast)) and close(fast)
    assert fast.model.layers[0].self_attn.qkv_proj.lora_a.shape == (1, 64, 12)  # q, k, v's A stacked, B block-diagonal
    assert hasattr(model.get_base_model().model.layers[0].self_attn.q_proj, "lora_A")  # the model itself untouched
    # no adapter: every layer int4; an adapter on some fused parts only: merged into them, int8
    plain = grid_llama()
    assert all(type(x) is Int4WeightOnlyLinear and x.lora_a is None for x in layers(weight_only_copy(plain, int4=True)))
    partial = layers(weight_only_copy(grid_llama(adapter_on=["q_proj"]), int4=True))
    assert type(partial[0]) is Int8WeightOnlyLinear and type(partial[1]) is Int4WeightOnlyLinear
    # where int4 does not pay (AVX2 only): every layer and the LM head int8, the adapter merged
    fast = weight_only_copy(model, int4=False)
    assert all(type(x) is Int8WeightOnlyLinear for x in layers(fast)) and close(fast)
    assert type(fast.get_output_embeddings()) is Int8WeightOnlyLinear


def test_compiled_int4_steps_with_the_adapter_beside_them_match_the_merged_model(monkeypatch):
    monkeypatch.setattr(weight_only, "LORA_SIDE_PATH_MIN_WEIGHTS", 0)
    model = grid_llama(adapter_on="all-linear")
    merged = copy.deepcopy(model).merge_and_unload()
    decoder = CompiledDecoder(model, max_length=64, int4=True).start()
    assert decoder.wait(timeout=600), decoder.error
    assert isinstance(decoder.llm.model.layers[0].mlp.gate_up_proj, Int4WeightOnlyLinear)
    prompt, tokens = torch.tensor([[1, 17, 305, 9]]), [31, 502, 77]
    with torch.inference_mode():
        reference_cache, cache = DynamicCache(config=merged.config), DynamicCache(config=merged.config)
        merged(input_ids=prompt, past_key_values=reference_cache, use_cache=True)
        merged(input_ids=prompt, past_key_values=cache, use_cache=True)
        reference = [merged(input_ids=torch.tensor([[t]]), past_key_values=reference_cache,
                            use_cache=True).logits[:, -1] for t in tokens]
        with decoder.steps(cache, torch.ones_like(prompt), max_new_tokens=len(tokens)) as step:
            ours = [step(torch.tensor([t])).float() for t in tokens]
    for mine, theirs in zip(ours, reference):
        assert torch.allclose(mine, theirs, atol=0.05 * theirs.abs().max().item())


# ---- batches: left-padded rows, for batch VQA (--compile always) ---------------------------------------------------

@pytest.fixture(scope="module")
def batch_decoder(model_and_processor):
    decoder = CompiledDecoder(model_and_processor[0].llm, max_length=128, batch_size=3).start()
    assert decoder.wait(timeout=600), decoder.error
    return decoder


def test_batch_steps_take_left_padded_rows_as_eager_steps_do(batch_decoder):
    decoder = batch_decoder
    llm, config = decoder.llm, decoder.llm.config  # the same weights, run eagerly: only the compiled kernels differ
    prompt = torch.tensor([[1, 17, 305, 9, 44, 12], [0, 0, 40, 41, 42, 43], [0, 0, 0, 0, 7, 8]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    tokens = [[31, 5, 9], [502, 6, 10], [77, 7, 11]]
    with torch.inference_mode():
        def prefilled():
            cache = DynamicCache(config=config)
            llm(input_ids=prompt, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache, use_cache=True)
            return cache

        eager, eager_cache, step_mask, positions = [], prefilled(), mask, mask.sum(-1, keepdim=True)
        for t in tokens:
            step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            eager.append(llm(input_ids=torch.tensor(t)[:, None], attention_mask=step_mask, position_ids=positions,
                             past_key_values=eager_cache, use_cache=True).logits[:, -1].float())
            positions = positions + 1
        cache = prefilled()
        with decoder.steps(cache, mask, max_new_tokens=len(tokens)) as step:
            assert step is not None
            compiled = [step(torch.tensor(t)).float() for t in tokens]
        with decoder.steps(prefilled(), mask[:2], 8) as step:
            assert step is None  # two rows: not the batch size it was compiled for
        # the last row alone, unpadded: the padding must be invisible to it
        alone_cache = DynamicCache(config=config)
        llm(input_ids=prompt[2:, 4:], past_key_values=alone_cache, use_cache=True)
        alone = [llm(input_ids=torch.tensor([[t[2]]]), past_key_values=alone_cache, use_cache=True).logits[:, -1].float()
                 for t in tokens]
    for ours, reference, single in zip(compiled, eager, alone):
        assert torch.allclose(ours, reference, atol=0.05 * reference.abs().max().item())
        assert torch.allclose(ours[2:], single, atol=0.05 * single.abs().max().item())
    assert cache.get_seq_length() == prompt.shape[1] + len(tokens)  # handed back as eager steps leave it
    for mine, theirs in zip(cache.layers, eager_cache.layers):
        assert torch.allclose(mine.keys.float(), theirs.keys.float(), atol=0.05 * theirs.keys.abs().max().item())


def test_batch_vqa_uses_the_batch_steps_for_full_batches_only(model_and_processor, batch_decoder):
    model, processor = model_and_processor
    engine = Engine(model, processor)

    def ask(n):  # two questions about one image (a shared prefix, then a masked gap), the rest about others
        images = [[random_image(1)], [random_image(1)]] + [[random_image(k)] for k in range(2, n)]
        questions = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                     for q in ("What colour?", "What shape is it?", "Is it big?", "Where?")[:n]]
        return engine.answer_batch(questions, images, GenerationConfig(max_new_tokens=6))

    with compiled_calls(engine, batch_decoder) as steps:
        assert len(ask(3)) == 3
        # three rows: compiled steps (their logits: the test above)
        assert steps and {args[0].shape[0] for args in steps} == {3}
        steps.clear()
        assert len(ask(2)) == 2 and not steps  # a batch of another size steps eagerly
