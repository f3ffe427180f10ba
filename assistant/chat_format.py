"""Conversations to token ids, through the LLM's own chat template.

- Images: each image becomes one `<image>` special token in the text, expanded to the projector's
  token count; the model later writes the image features into exactly those positions.
- Escaping: everything people write (user, assistant and system text) is tokenised with
  `split_special_tokens=True`, so typed `<image>`, `<|im_start|>` and the like stay plain text and
  can never create image positions or role markers.
- Labels: only assistant replies (and the end-of-turn token that follows each) are trained on.

Messages are dicts {"role": "system"|"user"|"assistant", "content": str | list of parts}, where a
part is {"type": "image"} or {"type": "text", "text": str}. Images are passed separately, in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORE_INDEX = -100
# Sentinels stand in for people's text while the template is rendered; private-use characters that
# no template or tokenizer produces by itself.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")

# Used when an LLM ships without a chat template (a base model): plain ChatML.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ConversationError(ValueError):
    """The conversation cannot be encoded (bad roles, image count mismatch, empty turns...)."""


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int] | None
    num_images: int


def normalise_messages(messages) -> list[dict]:
    """Check roles and turn every content into a list of parts."""
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


class ChatFormatter:
    def __init__(self, tokenizer, image_token: str, tokens_per_image: int):
        self.tokenizer = tokenizer
        if tokenizer.chat_template is None:
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.tokens_per_image = tokens_per_image

    def count_images(self, messages) -> int:
        return sum(p["type"] == "image" for m in normalise_messages(messages) for p in m["content"])

    def encode(self, messages, *, add_generation_prompt: bool, with_labels: bool = False) -> EncodedConversation:
        messages = normalise_messages(messages)
        texts: list[str] = []  # people's text, by sentinel number
        owners: list[str] = []  # role that wrote each text
        rendered_messages = []
        for m in messages:
            pieces = []
            for p in m["content"]:
                if p["type"] == "image":
                    pieces.append(self.image_token + "\n")
                elif p["text"]:
                    pieces.append(_SENTINEL.format(len(texts)))
                    texts.append(p["text"])
                    owners.append(m["role"])
            rendered_messages.append({"role": m["role"], "content": "".join(pieces)})
        rendered = self.tokenizer.apply_chat_template(
            rendered_messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        ids: list[int] = []
        labels: list[int] = []
        label_next_template_token = False
        pos = 0
        for match in list(_SENTINEL_RE.finditer(rendered)) + [None]:
            template_part = rendered[pos: match.start() if match else len(rendered)]
            if template_part:
                part_ids = self._template_ids(template_part)
                ids += part_ids
                part_labels = [IGNORE_INDEX] * len(part_ids)
                if label_next_template_token and part_ids:
                    part_labels[0] = part_ids[0]  # the end-of-turn token after a reply
                labels += part_labels
            label_next_template_token = False
            if match is None:
                break
            n = int(match.group(1))
            text_ids = self.tokenizer(texts[n], add_special_tokens=False, split_special_tokens=True).input_ids
            ids += text_ids
            if owners[n] == "assistant":
                labels += text_ids
                label_next_template_token = True
            else:
                labels += [IGNORE_INDEX] * len(text_ids)
            pos = match.end()
        num_images = sum(p["type"] == "image" for m in messages for p in m["content"])
        return EncodedConversation(ids, labels if with_labels else None, num_images)

    def _template_ids(self, text: str) -> list[int]:
        """Template text: special tokens are real; each image token expands to its positions."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self.image_token_id not in ids:
            return ids
        out = []
        for t in ids:
            out.extend([t] * self.tokens_per_image if t == self.image_token_id else [t])
        return out
