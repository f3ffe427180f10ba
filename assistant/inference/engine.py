"""The inference engine behind the chat UI, the API and batch VQA.

- `Engine.answer_batch`: many independent questions at once (one vision-tower call per batch, questions
  about the same image share its prefix: shared_prefix.py; on the CPU the batch is one packed sequence,
  packed_batch.py, elsewhere left-padded rows), greedy answers identical to one-at-a-time.
- `Engine.stream_chat`: one turn of a `ChatSession`, streamed as text deltas. A session keeps its
  KV cache and its images' features: a follow-up re-encodes no image and only feeds the tokens
  the cache does not already hold (prefix caching, so a re-rendered history costs nothing).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..cpu.background_compile import computed_while_replying, replying
from ..inputs.chat_format import ConversationError
from ..inputs.images import load_image
from .generation import GenerationConfig, TextStream, decode, end_token_ids, prefill
from .packed_batch import PackedBatch, decode_packed, supports_packing
from .runtime import Runtime
from .shared_prefix import common_prefix_length, shared_prefix_groups


@dataclass
class ChatSession:
    """One conversation: its messages, its images (and their encoded features), its KV cache."""

    system_prompt: str | None = None
    messages: list[dict] = field(default_factory=list)
    images: list = field(default_factory=list)  # PIL images, in order of appearance
    image_ids: list[int] = field(default_factory=list)  # stable identity of each image (for the cache)
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # image id -> projector output
    cache: DynamicCache | None = None
    cached_keys: list[int] = field(default_factory=list)  # what the cache holds, one key per position
    notices: list[str] = field(default_factory=list)
    image_keys: dict[str, int] = field(default_factory=dict)  # caller's image key (e.g. file hash) -> id
    finish_reason: str | None = None  # of the last reply: "stop" (end or stop string) or "length"
    usage: dict = field(default_factory=dict)  # of the last reply: prompt_tokens, completion_tokens
    _ids = itertools.count(1)

    def sync(self, messages: list[dict], images: list, image_keys: list[str]) -> None:
        """Replace the conversation (e.g. with a UI's history after an edit, undo or retry), keeping the
        KV cache and the features of images seen before (matched by `image_keys`)."""
        ids = []
        for key in image_keys:
            if key not in self.image_keys:
                self.image_keys[key] = next(self._ids)
            ids.append(self.image_keys[key])
        self.messages = [dict(m) for m in messages]
        self.images = [load_image(im) for im in images]
        self.image_ids = ids
        self.features = {i: f for i, f in self.features.items() if i in set(ids)}
        self.image_keys = {k: v for k, v in self.image_keys.items() if v in set(ids)}

    def add_user_message(self, text: str, images=()) -> None:
        parts = []
        for im in images:
            self.images.append(load_image(im))
            self.image_ids.append(next(self._ids))
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
        if not parts:
            raise ConversationError("empty message: type a question or attach an image")
        self.messages.append({"role": "user", "content": parts})

    def full_messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages

    def drop_oldest_turn(self) -> bool:
        """Forget the oldest user message and the replies after it (with its images)."""
        if len(self.messages) <= 1:
            return False
        end = 1
        while end < len(self.messages) and self.messages[end]["role"] != "user":
            end += 1
        if end >= len(self.messages):
            return False  # only the current question is left
        n_images = sum(p["type"] == "image" for m in self.messages[:end] for p in m["content"])
        for image_id in self.image_ids[:n_images]:
            self.features.pop(image_id, None)
        del self.images[:n_images], self.image_ids[:n_images], self.messages[:end]
        return True

    def reset(self) -> None:
        self.messages.clear(), self.images.clear(), self.image_ids.clear(), self.features.clear()
        self.cache, self.cached_keys = None, []


class Engine:
    def __init__(self, model, processor, runtime: Runtime | None = None, *, context_length: int | None = None):
        """`runtime`: how the model runs fast here (load_for_inference gives it); None: plain transformers."""
        self.model = model.eval()
        self.runtime = runtime or Runtime()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.end_ids = end_token_ids(self.tokenizer, model.llm)
        llm_config = model.llm.config
        self.context_length = context_length or getattr(llm_config, "max_position_embeddings", 2048)
        self.vision_calls = 0  # counted, so tests can prove follow-ups re-encode nothing
        self.lock = threading.Lock()

    # ---- images ------------------------------------------------------------------------------
    def encode_images(self, images) -> torch.Tensor:
        return self._features([self.processor.preprocess_images(images)])

    # ---- batch questions -------------------------------------------------------------------
    def answer_batch(self, conversations, images, config: GenerationConfig | None = None) -> list[str]:
        """Answer a batch of conversations (each with its list of images); returns the replies."""
        with replying():  # compiles that yield to replies wait (background_compile.py)
            return self._answer_batch(conversations, images, config)

    def _answer_batch(self, conversations, images, config):
        config = (config or GenerationConfig(max_new_tokens=32)).validate()
        ids = [self.processor.encode(c, ims).input_ids for c, ims in zip(conversations, images)]
        pixels = [self.processor.preprocess_images(ims) if ims else None for ims in images]
        groups = shared_prefix_groups(ids, pixels, self.processor.image_token_id)
        if len(ids) > 1 and supports_packing(self.model.llm):  # one packed sequence, no padding (packed_batch.py)
            features = self._features([pixels[members[0]] for members, _ in groups if pixels[members[0]] is not None])
            steps = decode_packed(self.model, PackedBatch(ids, groups), features, config, self.end_ids,
                                  self.runtime.decoder)
        elif len(groups) == len(ids):  # nothing shared: one left-padded prefill
            batch = self.processor.pad(ids, padding_side="left")
            features = self._features([p for p in pixels if p is not None])
            with torch.inference_mode():
                embeds = self.model.embed(batch["input_ids"], features)
            steps = decode(self.model, embeds, batch["attention_mask"], config, self.end_ids,
                           decoder=self.runtime.decoder)
        else:
            steps = self._decode_with_shared_prefixes(ids, pixels, groups, config)
        streams = [TextStream(self.tokenizer, config.stop) for _ in conversations]
        done = [False] * len(conversations)
        for step in steps:
            for i, token in enumerate(step.tolist()):
                if done[i]:
                    continue
                if token in self.end_ids:
                    done[i] = True
                    continue
                streams[i].push(token)
                done[i] = streams[i].stopped
            if all(done):
                break
        return [s.text.rstrip("\ufffd").strip() for s in streams]

    def _features(self, pixel_list) -> torch.Tensor | None:
        """One vision-tower call for already preprocessed images (a list of pixel tensors)."""
        if not pixel_list:
            return None
        self.vision_calls += 1
        with torch.inference_mode():
            return self.model.encode_images(torch.cat(pixel_list))

    def _decode_with_shared_prefixes(self, ids, pixels, groups, config):
        """Each group's prefix (system prompt, images, common words) computed once; its KV cache is
        copied to the group's rows, which then feed only their own tokens."""
        firsts = [members[0] for members, _ in groups]
        prefixes = self.processor.pad([ids[r][:length] for r, (_, length) in zip(firsts, groups)],
                                      padding_side="left")
        features = self._features([pixels[r] for r in firsts if pixels[r] is not None])
        cache = DynamicCache(config=self.model.llm.config)
        with torch.inference_mode():
            prefill(self.model, self.model.embed(prefixes["input_ids"], features), prefixes["attention_mask"], cache)
        group_of = [0] * len(ids)
        for g, (members, length) in enumerate(groups):
            for r in members:
                group_of[r] = g
        rows = torch.tensor(group_of)
        cache.batch_select_indices(rows.to(self.model.device))
        suffixes = self.processor.pad([ids[r][groups[group_of[r]][1]:] for r in range(len(ids))], padding_side="left")
        # [left-padded prefix | left-padded suffix]: the gap is masked, positions count real tokens only
        mask = torch.cat([prefixes["attention_mask"][rows], suffixes["attention_mask"]], dim=1)
        with torch.inference_mode():
            embeds = self.model.embed(suffixes["input_ids"], None)
        return decode(self.model, embeds, mask, config, self.end_ids, cache=cache, decoder=self.runtime.decoder,
                      past_length=prefixes["input_ids"].shape[1])

    # ---- chat --------------------------------------------------------------------------------
    def stream_chat(self, session: ChatSession, config: GenerationConfig | None = None, should_stop=None):
        """Answer the session's last user message; yields text deltas, then records the reply."""
        config = (config or GenerationConfig()).validate()
        ids = self._fit_context(session, config)
        keys = self._position_keys(ids, session)
        reuse = common_prefix_length(keys, session.cached_keys)
        reuse = min(reuse, len(ids) - 1)  # at least one new position, for fresh logits
        if session.cache is None or reuse == 0:
            session.cache, reuse = DynamicCache(config=self.model.llm.config), 0
        elif session.cache.get_seq_length() > reuse:
            session.cache.crop(reuse - session.cache.get_seq_length())  # negative: drop that many positions
        missing = [i for i, im_id in enumerate(session.image_ids) if im_id not in session.features]
        if missing:
            with replying():  # compiles that yield to replies wait (background_compile.py)
                new = self.encode_images([session.images[i] for i in missing])
            for k, i in enumerate(missing):
                session.features[session.image_ids[i]] = new[k]
        features = torch.stack([session.features[i] for i in session.image_ids]) if session.image_ids else None
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            embeds = self.model.embed(input_ids, features)[:, reuse:]
        mask = torch.ones((1, len(ids)), dtype=torch.long)
        stream = TextStream(self.tokenizer, config.stop)
        generated: list[int] = []
        session.cached_keys = []  # invalid while the cache is being extended
        try:
            steps = decode(self.model, embeds, mask, config, self.end_ids, cache=session.cache, past_length=reuse,
                           decoder=self.runtime.decoder,
                           should_stop=should_stop)
            for step in computed_while_replying(steps):  # the prompt and each step; not the caller's work
                token = int(step[0])
                generated.append(token)
                if token in self.end_ids:
                    break
                delta = stream.push(token)
                if delta:
                    yield delta
                if stream.stopped:
                    break
            tail = stream.finish()
            if tail:
                yield tail
        finally:
            # The cache holds the prompt and every generated token but the last (never fed back).
            session.cached_keys = keys + generated[:-1]
            ended = bool(generated) and (generated[-1] in self.end_ids or stream.stopped)
            session.finish_reason = "stop" if ended else "length"
            session.usage = {"prompt_tokens": len(ids), "completion_tokens": len(generated),
                             "total_tokens": len(ids) + len(generated)}
            session.messages.append({"role": "assistant", "content": [{"type": "text", "text": stream.text.strip()}]})

    def explain(self, messages: list[dict], images: list, answer: str, method: str = "gradient"):
        """Where the model looked for `answer` to `messages` (assistant/explain.py)."""
        from ..explain import explain

        with replying():  # compiles that yield to replies wait (background_compile.py)
            return explain(self.model, self.processor, messages, images, answer, method=method)

    def chat(self, session: ChatSession, config: GenerationConfig | None = None) -> str:
        return "".join(self.stream_chat(session, config))

    def _fit_context(self, session: ChatSession, config: GenerationConfig) -> list[int]:
        """Token ids of the conversation, dropping the oldest turns (with a notice) until it fits."""
        budget = self.context_length - config.max_new_tokens
        while True:
            encoded = self.processor.encode(session.full_messages(), session.images)
            if len(encoded.input_ids) <= budget:
                return encoded.input_ids
            if not session.drop_oldest_turn():
                raise ConversationError(
                    f"the message is too long: {len(encoded.input_ids)} tokens, but the model reads at most "
                    f"{budget} (context {self.context_length} minus {config.max_new_tokens} for the reply)"
                )
            session.notices.append("The conversation outgrew the model's context: the oldest turn was dropped.")

    def _position_keys(self, ids: list[int], session: ChatSession) -> list[int]:
        """Token ids, with each image position keyed by its image's identity (negative)."""
        keys, n, per = list(ids), 0, self.model.tokens_per_image
        image_token = self.processor.image_token_id
        for i, t in enumerate(ids):
            if t == image_token:
                keys[i] = -session.image_ids[n // per]
                n += 1
        return keys
