"""Conversations to token ids, as the checkpoint's own processor builds them.

One prompt builder for every model:

- The whole conversation is rendered by the checkpoint's chat template with typed content parts
  (`{"type": "image"}`, `{"type": "text", "text": ...}`), the form transformers' processors, vLLM and
  SGLang send. A template written for plain-string content (SmolLM2's own) is wrapped so that it reads
  typed parts too: each image becomes `<image>` and a newline before the text (`typed_template`).
- The rendered text is tokenised in one piece, as the tokenizer would: BOS and other special tokens as
  the tokenizer adds them, people's text in context with the template text around it.
- Image placeholders are then expanded to the model's positions per image, as transformers' processors
  do: where the template put them (LLaVA), or all before the prompt (BLIP-2, `image_layout="prefix"`).
- Beyond transformers: text people write (user, assistant and system) never becomes a special token, a
  role marker or an image position. Where it would, that text alone is tokenised with special tokens
  split, and everything else stays as above.
- Labels: only assistant replies (and an end-of-turn special token right after each) are trained on.

Messages are dicts {"role": "system"|"user"|"assistant", "content": str | list of parts}. Images are
passed separately, in order.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

IGNORE_INDEX = -100
log = logging.getLogger(__name__)

# Sentinels stand in for people's text while the template is rendered, to find where that text lands;
# private-use characters that no template or tokenizer produces by itself.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")

# Used, with a warning, when neither the checkpoint nor its tokenizer has a chat template: plain ChatML.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Turns typed content into the plain string a string-only template expects (an image: the image token and a
# newline, then the text), then runs that template unchanged.
_TYPED_TO_STRING = (
    "{%- set converted = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = namespace(value=message['content']) -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{%- set text.value = text.value + IMAGE_TOKEN + '\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': text.value}] -%}"
    "{%- endfor -%}"
    "{%- set messages = converted.messages -%}"
)


class ConversationError(ValueError):
    """The conversation cannot be encoded (bad roles, image count mismatch, empty turns...)."""


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int] | None
    num_images: int


def normalise_messages(messages) -> list[dict]:
    """Check roles and turn every content into a list of typed parts."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ConversationError(f"message {i}: expected a dict with 'role' and 'content'")
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise ConversationError(f"message {i}: unknown role {role!r} (use system, user or assistant)")
        content = m.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": str(p.get("text", ""))})
                elif kind in ("image", "image_url"):
                    parts.append({"type": "image"})
                else:
                    raise ConversationError(f"message {i}, part {j}: expected type 'text' or 'image'")
        else:
            raise ConversationError(f"message {i}: content must be a string or a list of parts")
        if role != "user" and any(p["type"] == "image" for p in parts):
            raise ConversationError(f"message {i}: images can only be in user messages, not {role}")
        out.append({"role": role, "content": parts})
    return out


def renders_typed_parts(tokenizer, template: str) -> bool:
    """Whether `template` reads typed content parts (llava-hf, Qwen2-VL...) rather than plain strings."""
    probe = "\ue002probe\ue003"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": probe}]}], chat_template=template, tokenize=False)
    except Exception:  # a string-only template concatenating a list, say
        return False
    return probe in rendered


def typed_template(tokenizer, template: str, image_token: str) -> str:
    """`template` itself when it reads typed parts; else the same template behind a converter from typed parts
    to its plain strings (what exports carry, so transformers' typed calls work on them)."""
    if renders_typed_parts(tokenizer, template):
        return template
    return _TYPED_TO_STRING.replace("IMAGE_TOKEN", repr(image_token)) + template


class ChatFormatter:
    """Builds a conversation's token ids (and training labels) as the checkpoint's processor would.

    `chat_template`: the checkpoint's template (None: the tokenizer's, else ChatML with a warning).
    `image_layout`: "inline" (the template places each image token: LLaVA) or "prefix" (every image's
    positions before the whole prompt, ahead of BOS: BLIP-2's processor)."""

    def __init__(self, tokenizer, image_token: str, tokens_per_image: int, chat_template: str | None = None,
                 image_layout: str = "inline", source: str = "the LLM"):
        self.tokenizer = tokenizer
        template = chat_template or tokenizer.chat_template
        if template is None:
            log.warning("%s has no chat template: using plain ChatML", source)
            template = FALLBACK_CHAT_TEMPLATE
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = typed_template(tokenizer, template, image_token)
        self.tokens_per_image = tokens_per_image
        if image_layout not in ("inline", "prefix"):
            raise ValueError(f"image_layout must be 'inline' or 'prefix', not {image_layout!r}")
        self.image_layout = image_layout
        self.special_ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.special_ids |= set(tokenizer.all_special_ids) | {self.image_token_id}

    def render(self, messages, *, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int, str]]]:
        """The template's text for `messages` (normalised: normalise_messages), and where people's text lies in
        it: (start, end, role)."""
        texts: list[tuple[str, str]] = []  # (text, role), by sentinel number
        with_sentinels, with_texts = [], []
        for m in messages:
            sentinel_parts, text_parts = [], []
            for p in m["content"]:
                if p["type"] == "image" and self.image_layout == "prefix":
                    continue  # BLIP-2: the processor puts image positions before the prompt, not the template
                if p["type"] == "text":
                    sentinel_parts.append({"type": "text", "text": _SENTINEL.format(len(texts))})
                    texts.append((p["text"], m["role"]))
                else:
                    sentinel_parts.append(p)
                text_parts.append(p)
            with_sentinels.append({"role": m["role"], "content": sentinel_parts})
            with_texts.append({"role": m["role"], "content": text_parts})
        skeleton = self._apply(with_sentinels, add_generation_prompt)
        rendered, spans, pos = [], [], 0
        for match in _SENTINEL_RE.finditer(skeleton):
            rendered.append(skeleton[pos:match.start()])
            text, role = texts[int(match.group(1))]
            start = sum(map(len, rendered))
            rendered.append(text)
            spans.append((start, start + len(text), role))
            pos = match.end()
        rendered = "".join(rendered) + skeleton[pos:]
        real = self._apply(with_texts, add_generation_prompt)
        if real != rendered:  # the template changes the text itself (trims it, say): find each text in its output
            rendered, spans, pos = real, [], 0
            for text, role in texts:
                text = text.strip()
                at = real.find(text, pos) if text else -1
                if at >= 0:
                    spans.append((at, at + len(text), role))
                    pos = at + len(text)
        return rendered, spans

    def _apply(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, messages, *, add_generation_prompt: bool, with_labels: bool = False) -> EncodedConversation:
        messages = normalise_messages(messages)
        num_images = sum(p["type"] == "image" for m in messages for p in m["content"])
        rendered, spans = self.render(messages, add_generation_prompt=add_generation_prompt)
        ids, offsets = self._tokenize(rendered, spans)
        placed = ids.count(self.image_token_id)
        if self.image_layout == "inline" and placed != num_images:
            raise ConversationError(f"the chat template placed {placed} image placeholder(s) for {num_images} "
                                    "image(s); it does not render typed image parts")
        labels = self._labels(ids, offsets, spans) if with_labels else None
        out_ids, out_labels = [], []
        if self.image_layout == "prefix":
            out_ids = [self.image_token_id] * (self.tokens_per_image * num_images)
            out_labels = [IGNORE_INDEX] * len(out_ids)
        for k, t in enumerate(ids):  # each placeholder -> that image's positions
            n = self.tokens_per_image if t == self.image_token_id else 1
            out_ids += [t] * n
            if labels is not None:
                out_labels += [labels[k]] * n
        return EncodedConversation(out_ids, out_labels if with_labels else None, num_images)

    def _tokenize(self, text: str, spans) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of `text`, as the processor tokenises it, except that special tokens
        are never read out of people's text (`spans`)."""
        bos = self.tokenizer.bos_token
        # as processor.apply_chat_template(tokenize=True): the tokenizer's BOS/EOS unless the template wrote BOS
        add_special = not (bos is not None and text.startswith(bos))
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        in_text = [k for k, (t, (s, e)) in enumerate(zip(ids, offsets)) if t in self.special_ids and e > s
                   and any(s < span_end and e > span_start for span_start, span_end, _ in spans)]
        if not in_text:
            return ids, offsets
        # Someone typed a special token: cut the text at the template's own special tokens only, and tokenise each
        # piece between them with special tokens split (as the tokenizer itself tokenises between special tokens).
        template_specials = [k for k, (t, (s, e)) in enumerate(zip(ids, offsets))
                             if t in self.special_ids and e > s and k not in in_text]
        head = []  # what the tokenizer adds around the text (BOS...) carries no offsets
        while len(head) < len(ids) and offsets[len(head)] == (0, 0):
            head.append(len(head))
        tail = []
        while len(ids) - len(tail) - 1 >= len(head) and offsets[len(ids) - len(tail) - 1] == (0, 0):
            tail.insert(0, len(ids) - len(tail) - 1)
        out_ids, out_offsets = [ids[k] for k in head], [offsets[k] for k in head]
        pos = 0
        for k in template_specials + [None]:
            end = offsets[k][0] if k is not None else len(text)
            if end > pos:
                piece = self.tokenizer(text[pos:end], add_special_tokens=False, split_special_tokens=True,
                                       return_offsets_mapping=True)
                out_ids += piece["input_ids"]
                out_offsets += [(s + pos, e + pos) for s, e in piece["offset_mapping"]]
            if k is None:
                break
            out_ids.append(ids[k])
            out_offsets.append(offsets[k])
            pos = offsets[k][1]
        out_ids += [ids[k] for k in tail]
        out_offsets += [offsets[k] for k in tail]
        return out_ids, out_offsets

    def _labels(self, ids, offsets, spans) -> list[int]:
        """Assistant text is learned, and a special token right after it (the end of the turn)."""
        labels = [IGNORE_INDEX] * len(ids)
        replies = [(s, e) for s, e, role in spans if role == "assistant" and e > s]
        for start, end in replies:
            last = None
            for k, (s, e) in enumerate(offsets):
                if e > s and s < end and e > start:
                    labels[k] = ids[k]
                    last = k
            if last is not None and last + 1 < len(ids) and ids[last + 1] in self.special_ids \
                    and ids[last + 1] != self.image_token_id:
                labels[last + 1] = ids[last + 1]
        return labels
