"""Token generation: one decode loop for the chat UI, the API and batch VQA.

A loop of our own rather than `generate()` because the engine needs three things at once: a plain
Python iterator for streaming (no thread), cancellation between any two tokens, and KV caches that
outlive one call (a chat session continues from its cache). Sampling reuses transformers' logits
processors; the cache is transformers' DynamicCache.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from ..model.vision_language_model import base_llm


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    seed: int | None = None

    def validate(self) -> "GenerationConfig":
        if not 1 <= self.max_new_tokens <= 32768:
            raise ValueError(f"max_new_tokens must be between 1 and 32768, not {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature must be between 0 and 5, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        return self

    def logits_processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature > 0:
            procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


def end_token_ids(tokenizer, llm) -> set[int]:
    """Tokens that end a reply: the tokenizer's EOS and whatever the model's generation config lists."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(llm, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and token in tokenizer.get_vocab():
            ids.add(tid)
    return ids


def cache_kwarg(llm) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40)."""
    base = base_llm(llm)
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count real tokens only, as in training."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def prefill(model, inputs_embeds, attention_mask, cache: DynamicCache, past_length: int = 0):
    """Run `inputs_embeds` through the LLM into `cache` (positions after `past_length`); returns the
    LLM's output, with the logits of the last position only."""
    positions = position_ids_from_mask(attention_mask)[:, past_length:]
    return model.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask.to(inputs_embeds.device),
                     position_ids=positions.to(inputs_embeds.device), use_cache=True, logits_to_keep=1,
                     **{cache_kwarg(model.llm): cache})


@torch.inference_mode()
def decode(model, inputs_embeds, attention_mask, config: GenerationConfig, end_ids: set[int], *,
           cache: DynamicCache | None = None, past_length: int = 0, should_stop=None, decoder=None):
    """Prefill `inputs_embeds` (after `past_length` cached positions) and decode, the steps through `decoder` (the
    runtime's compiled decode steps) where it takes them, else eagerly.

    Yields, after each step, a tensor of the new token ids (one per row; rows that finished yield
    their end token again). Stops when every row has ended, at max_new_tokens, or when
    `should_stop()` turns true. The cache is extended in place.
    """
    llm = model.llm
    cache = cache if cache is not None else DynamicCache(config=llm.config)
    full_mask = attention_mask.to(inputs_embeds.device)
    positions = position_ids_from_mask(full_mask)[:, past_length:]
    out = prefill(model, inputs_embeds, full_mask, cache, past_length)
    with decoder.steps(cache, full_mask, config.max_new_tokens) if decoder else contextlib.nullcontext() as step:
        feed = padded_feed(llm, full_mask, positions, cache, step)
        yield from decode_steps(out.logits[:, -1, :], config, end_ids, feed, should_stop)


def greedy_ids(scores: torch.Tensor) -> torch.Tensor:
    """The argmax of each row. On the CPU through numpy, many times faster than torch's CPU argmax over a
    vocabulary-wide row, and it runs once per generated token."""
    if scores.device.type == "cpu":
        return torch.from_numpy(scores.numpy().argmax(-1))
    return scores.argmax(dim=-1)


def choose_next_tokens(config: GenerationConfig, end_ids: set[int], batch: int, device):
    """`choose(logits, finished) -> token ids`, one per row: greedy or sampled as `config` says, with its
    logits processors (which see each row's tokens chosen so far); rows already `finished` get an end token."""
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    processors = config.logits_processors()
    ends = sorted(end_ids)
    fill = torch.tensor(ends[0] if ends else 0, device=device)
    history = torch.zeros((batch, 0), dtype=torch.long, device=device)

    def choose(logits: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        nonlocal history
        logits = logits.float()
        scores = processors(history, logits) if processors else logits
        if config.temperature > 0:
            next_ids = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_ids = greedy_ids(scores)
        next_ids = torch.where(finished, fill, next_ids)
        history = torch.cat([history, next_ids[:, None]], dim=1)
        return next_ids

    return choose


def decode_steps(logits, config: GenerationConfig, end_ids: set[int], feed, should_stop=None):
    """The loop after the prompt: pick each row's token from `logits` (rows, vocab), yield them, and get the
    next logits from `feed(token_ids, finished)`, which feeds the tokens to the model (padded_feed, or
    packed_batch.py's for packed batches). Stops when every row has ended, at max_new_tokens, or when
    `should_stop()` turns true."""
    device, batch = logits.device, logits.shape[0]
    choose = choose_next_tokens(config, end_ids, batch, device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    end_tensor = torch.tensor(sorted(end_ids), device=device)
    for k in range(config.max_new_tokens):
        next_ids = choose(logits, finished)
        yield next_ids
        finished |= torch.isin(next_ids, end_tensor)
        last = k == config.max_new_tokens - 1  # its token is never fed: the cache holds all but the last
        if last or bool(finished.all()) or (should_stop is not None and should_stop()):
            return
        logits = feed(next_ids, finished)


def padded_feed(llm, full_mask, positions, cache, compiled_step=None):
    """`feed` for decode_steps over left-padded rows: one token for every row, through `compiled_step` when
    given, else through `llm` with `cache` (`full_mask`, `positions`: the prompt's)."""
    cache_kw = cache_kwarg(llm)

    def feed(next_ids, finished):
        nonlocal full_mask, positions
        full_mask = torch.cat([full_mask, torch.ones((full_mask.shape[0], 1), dtype=full_mask.dtype,
                                                     device=full_mask.device)], dim=1)
        positions = positions[:, -1:] + 1
        if compiled_step is not None:
            return compiled_step(next_ids)
        return llm(input_ids=next_ids[:, None], attention_mask=full_mask, position_ids=positions,
                   use_cache=True, **{cache_kw: cache}).logits[:, -1, :]

    return feed


class TextStream:
    """Incremental detokenisation with stop strings: feed token ids, get printable text deltas.

    Holds back text that could still become a stop string, and half-decoded UTF-8 characters."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped = True
                self.text = text[:at]
                return self._emit(self.text)
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1  # an incomplete multi-byte character
        for s in self.stop:  # a suffix that is a prefix of a stop string may still become one
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(text[:safe])

    def finish(self) -> str:
        """Flush what was held back (at the end of generation)."""
        return "" if self.stopped else self._emit(self.text.rstrip("\ufffd"))

    def _emit(self, upto: str) -> str:
        delta = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        return delta
