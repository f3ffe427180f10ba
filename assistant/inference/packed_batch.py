"""Batch questions as one packed sequence: no padding, no per-row copies of a shared prefix.

A batch of VQA questions is mostly the same few prefixes (system prompt and image, shared by the rows
that ask about one image: shared_prefix.py) followed by short questions of different lengths. Left
padding would compute every row to the longest one's length and copy each shared prefix's keys and values
into each of its rows. Here the batch is one sequence instead, laid out as

    [prefix of group 1 | prefix of group 2 | ... | question of row 1 | question of row 2 | ...]

and a boolean attention mask says who sees whom: a prefix token sees the earlier tokens of its own prefix,
a question token its group's prefix and the earlier tokens of its own question; positions restart for
each prefix and continue after it for each question, as if every row were alone. The linear layers and
the rest of each layer see only real tokens; the prompt's attention is computed row by row
(`AttentionLayout`: the whole sequence under one mask would cost the square of the batch's tokens). Each
decode step then feeds one token per unfinished row, appended to the same sequence: a row's token sees its
prefix, its question and its own earlier tokens. Rows that have finished are no longer computed (one-word
VQA answers: after the first step, only the few rows whose answer is longer).

Faster than left-padded rows, which compute padding, copy each shared prefix into each row's cache, and feed
every row until the last one ends (docs/performance.md).

CPU only (`supports_packing`: cpu/attention.py's attention, which takes the `packed_layout`); elsewhere the
engine pads. Compiled batch decode steps (cpu/compiled_decoder.py) take left-padded rows: the packed prompt's keys
and values are gathered into them (`AttentionLayout.padded_cache`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .generation import GenerationConfig, cache_kwarg, decode_steps, padded_feed, position_ids_from_mask


def supports_packing(llm) -> bool:
    """Packing needs cpu/attention.py's attention, which computes the prompt's attention row by row."""
    from ..cpu.attention import NAME
    from ..model.vision_language_model import base_llm

    base = base_llm(llm)
    return getattr(base.config, "_attn_implementation", None) == NAME


class PackedBatch:
    """The packed prompt of a batch (`input_ids`, `positions`) and who sees whom, as each key position's
    group (prefix tokens) or row (question and generated tokens), -1 where it has none."""

    def __init__(self, ids: list[list[int]], groups: list[tuple[list[int], int]]):
        self.rows = len(ids)
        self.row_group = [0] * self.rows
        for g, (members, _) in enumerate(groups):
            for r in members:
                self.row_group[r] = g
        tokens, key_group, key_row, positions = [], [], [], []
        self.prefixes = []  # (start, length) of each group's prefix in the sequence
        for g, (members, length) in enumerate(groups):
            self.prefixes.append((len(tokens), length))
            tokens += ids[members[0]][:length]
            key_group += [g] * length
            key_row += [-1] * length
            positions += range(length)
        self.questions = []  # (start, length) of each row's question
        self.last = []  # each row's last question token: its first answer token's logits come from there
        for r in range(self.rows):
            start = groups[self.row_group[r]][1]
            self.questions.append((len(tokens), len(ids[r]) - start))
            tokens += ids[r][start:]
            key_group += [-1] * (len(ids[r]) - start)
            key_row += [r] * (len(ids[r]) - start)
            positions += range(start, len(ids[r]))
            self.last.append(len(tokens) - 1)
        self.input_ids = torch.tensor([tokens])
        self.positions = torch.tensor([positions])
        self.key_group = torch.tensor(key_group)
        self.key_row = torch.tensor(key_row)
        self.next_position = [len(row) for row in ids]

    def prompt_mask(self) -> torch.Tensor:
        """(1, 1, tokens, tokens): causal, within a prefix, or from a question to its prefix and itself."""
        n = self.key_group.shape[0]
        query_group = torch.where(self.key_row >= 0, torch.tensor(self.row_group)[self.key_row.clamp(min=0)],
                                  self.key_group)
        sees = (self.key_group[None, :] == query_group[:, None]) | (
            (self.key_row[None, :] == self.key_row[:, None]) & (self.key_row[:, None] >= 0))
        causal = torch.ones((n, n), dtype=torch.bool).tril()
        return (sees & causal)[None, None]

    def prompt_attention_layout(self) -> "AttentionLayout":
        return AttentionLayout(self)

    def step(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one token for each of `rows`; returns their (1, 1, len(rows), keys) mask and positions."""
        new_rows = torch.tensor(rows)
        self.key_group = torch.cat([self.key_group, torch.full((len(rows),), -1)])
        self.key_row = torch.cat([self.key_row, new_rows])
        groups = torch.tensor([self.row_group[r] for r in rows])
        mask = (self.key_group[None, :] == groups[:, None]) | (self.key_row[None, :] == new_rows[:, None])
        positions = torch.tensor([[self.next_position[r] for r in rows]])
        for r in rows:
            self.next_position[r] += 1
        return mask[None, None], positions


def _left_padded(spans: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Index lists -> (rows, longest) indices, left-padded with 0, and where they are real."""
    width = max(len(s) for s in spans)
    index = torch.zeros((len(spans), width), dtype=torch.long)
    real = torch.zeros((len(spans), width), dtype=torch.bool)
    for i, s in enumerate(spans):
        if s:
            index[i, width - len(s):] = torch.tensor(s)
            real[i, width - len(s):] = True
    return index, real


class AttentionLayout:
    """The packed prompt's attention computed as the padded batch would compute it, but only there: each
    prefix as a row of its own, each question as a row whose keys are [its prefix | itself], both
    left-padded. Attending to the whole packed sequence under its mask grows with the square of the batch's
    tokens (a batch of 16: 525 x 525 a head, 3x the time of everything padded); gathering the rows costs
    little. Used by cpu/attention.py when the LLM is called with `packed_layout=`."""

    def __init__(self, packed: PackedBatch):
        prefix_spans = [list(range(start, start + length)) for start, length in packed.prefixes]
        question_spans = [list(range(start, start + length)) for start, length in packed.questions]
        self.parts = []
        self.calls = 0  # layers that attended through it
        index, real = _left_padded(prefix_spans)
        causal = torch.ones((index.shape[1],) * 2, dtype=torch.bool).tril()
        self._add(index, real, index, real[:, None, :] & causal)
        q_index, q_real = _left_padded(question_spans)
        p_index, p_real = _left_padded([prefix_spans[packed.row_group[r]] for r in range(packed.rows)])
        q_causal = torch.ones((q_index.shape[1],) * 2, dtype=torch.bool).tril()
        sees = torch.cat([p_real[:, None, :].expand(-1, q_index.shape[1], -1), q_real[:, None, :] & q_causal], dim=2)
        self.row_keys = torch.cat([p_index, q_index], dim=1)  # each row's keys: [its prefix | its question]
        self.row_mask = torch.cat([p_real, q_real], dim=1).long()
        self._add(q_index, q_real, self.row_keys, sees)

    def _add(self, query_index, query_real, key_index, sees):
        rows, width = query_index.shape
        # a padded query row sees nothing; let it see its own position so SDPA gives numbers (discarded)
        sees = sees.clone()
        diagonal = torch.arange(width)
        sees[:, diagonal, key_index.shape[1] - width + diagonal] |= ~query_real
        flat_real = query_real.flatten().nonzero().flatten()
        self.parts.append((query_index, key_index, sees[:, None], flat_real, query_index.flatten()[flat_real]))

    def padded_cache(self, cache: DynamicCache, config) -> DynamicCache:
        """The packed prompt's keys and values as the left-padded rows [prefix | question] that compiled batch
        decode steps take (their mask: `row_mask`)."""
        rows, width = self.row_keys.shape
        padded = DynamicCache(config=config)
        for layer, packed in enumerate(cache.layers):
            index = self.row_keys.flatten().to(packed.keys.device)
            keys, values = (t[0].index_select(1, index).view(t.shape[1], rows, width, -1).transpose(0, 1)
                            for t in (packed.keys, packed.values))
            padded.update(keys, values, layer)
        return padded

    def attend(self, query, key, value, scaling) -> torch.Tensor:
        """query (1, heads, tokens, dim), key/value (1, kv heads, tokens, dim) -> (1, tokens, heads, dim)."""
        self.calls += 1
        heads, tokens, dim = query.shape[1], query.shape[2], query.shape[3]
        out = query.new_empty((tokens, heads, dim))
        for query_index, key_index, sees, flat_real, targets in self.parts:
            rows, width = query_index.shape
            q = query[0].index_select(1, query_index.flatten()).view(heads, rows, width, dim).transpose(0, 1)
            k = key[0].index_select(1, key_index.flatten()).view(key.shape[1], rows, -1, dim).transpose(0, 1)
            v = value[0].index_select(1, key_index.flatten()).view(value.shape[1], rows, -1, dim).transpose(0, 1)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sees.to(q.device), scale=scaling,
                                                                 enable_gqa=True)
            out.index_copy_(0, targets.to(out.device), o.transpose(1, 2).reshape(rows * width, heads, dim)[flat_real])
        return out[None]


@torch.inference_mode()
def prefill_packed(model, packed: PackedBatch, features):
    """Run the packed prompt through the LLM: (each row's next-token logits, the cache, the attention layout)."""
    llm, device = model.llm, model.device
    cache = DynamicCache(config=llm.config)
    embeds = model.embed(packed.input_ids.to(device), features)
    layout = packed.prompt_attention_layout()
    # the mask is the layout's, row by row; transformers gets a placeholder (the full one, prompt_mask(), would
    # be tokens x tokens: 1.4 GB for 64 rows of 600 tokens)
    out = llm(inputs_embeds=embeds, attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
              position_ids=packed.positions.to(device), use_cache=True, packed_layout=layout,
              logits_to_keep=torch.tensor(packed.last, device=device), **{cache_kwarg(llm): cache})
    layers = llm.config.num_hidden_layers
    if layout.calls != layers:  # an attention that ignored the layout would have attended to everything
        raise RuntimeError(f"packed prompt: {layout.calls} of {layers} layers used its layout")
    return out.logits[0].float(), cache, layout


@torch.inference_mode()
def decode_packed(model, packed: PackedBatch, features, config: GenerationConfig, end_ids: set[int], decoder=None):
    """Prefill the packed prompt and decode; yields, after each step, the new token of every row (rows that
    finished yield an end token again), as generation.decode does; `decoder`: the runtime's compiled decode
    steps, used where they serve batches of this size."""
    llm, device = model.llm, model.device
    logits, cache, layout = prefill_packed(model, packed, features)  # (rows, vocab)
    if decoder is not None and decoder.batch_size == packed.rows and decoder.ready.is_set():
        # its graph takes left-padded rows: the prompt's keys and values gathered so, every row fed each step
        padded, mask = layout.padded_cache(cache, llm.config), layout.row_mask.to(device)
        with decoder.steps(padded, mask, config.max_new_tokens) as step:
            if step is not None:
                yield from decode_steps(logits, config, end_ids,
                                        padded_feed(llm, mask, position_ids_from_mask(mask), padded, step))
                return
    yield from decode_steps(logits, config, end_ids, _packed_feed(llm, packed, logits, cache))


def _packed_feed(llm, packed: PackedBatch, logits, cache):
    """`feed` for decode_steps in the packed sequence: one token for each row that has not finished; the
    others keep their last logits in `logits` (rows, vocab), updated in place."""
    cache_kw = cache_kwarg(llm)

    def feed(next_ids, finished):
        live = (~finished).nonzero().flatten()
        mask, positions = packed.step(live.tolist())
        out = llm(input_ids=next_ids[live][None], attention_mask=mask.to(logits.device),
                  position_ids=positions.to(logits.device), use_cache=True, **{cache_kw: cache})
        logits[live] = out.logits[0].float()
        return logits

    return feed
