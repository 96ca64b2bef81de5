"""Render chat samples into token ids with a part code for every token.

Rendering runs after reading and before the forward pass. Each token is prompt content, response
content, or template: role markers, separators, special tokens and any default system prompt that
the chat template injects. Template tokens are identical across samples, so they never enter
saliency or scores.

Content spans come from a skeleton. The chat template is rendered once with sentinel strings in
place of the message contents and once with the real contents. The real rendering must equal the
skeleton with the contents spliced in, which gives the character span of every content. Tokens
whose offsets lie fully inside a span take that message's part: system and user messages are
PROMPT, assistant messages are RESPONSE. Tokens that straddle a span boundary, zero-width tokens
and special tokens are TEMPLATE.

The plain template serves tokenizers without a chat template (or when asked for). It is the BOS
token when the tokenizer defines one, then per message::

    ### System:\\n{content}\\n\\n
    ### User:\\n{content}\\n\\n
    ### Assistant:\\n{content}{eos_token}\\n\\n

A sample longer than ``max_length`` tokens loses prompt tokens from the start of its earliest
prompt content first, then response tokens from the end of its last response. Template tokens
always stay, so the structure of the conversation survives truncation.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trimdb.errors import RenderError, SettingsError

logger = logging.getLogger(__name__)

TEMPLATE, PROMPT, RESPONSE = 0, 1, 2
PART_NAMES = {TEMPLATE: "template", PROMPT: "prompt", RESPONSE: "response"}
ROLE_PARTS = {"system": PROMPT, "user": PROMPT, "assistant": RESPONSE}

PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
)

# Sentinels carry delimiters on both sides, so sentinel 1 is never a prefix of sentinel 10.
SENTINEL_PREFIX = "<<TRIMDB_SENTINEL_"
PLAIN_TEMPLATE_HINT = "Render with the plain template instead (plain_template=True, --plain-template)."


@dataclass
class RenderedSample:
    """A rendered sample: token ids, one part code per token, and whether content was cut."""

    input_ids: list[int]
    parts: list[int]
    truncated: bool


@dataclass(frozen=True)
class _ContentSpan:
    start: int
    end: int
    part: int


class Renderer:
    """Render messages under one tokenizer's chat template (or the plain template) into tokens."""

    def __init__(self, tokenizer, max_length: int = 1024, plain_template: bool | None = None):
        if max_length < 2:
            raise SettingsError(
                f"max_length is {max_length}, but a sample needs at least 2 tokens. "
                "Use a max_length of 2 or more."
            )
        if not getattr(tokenizer, "is_fast", False):
            raise RenderError(
                f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer, so it returns "
                "no character offsets. Load it with use_fast=True."
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.plain_template, self.template = _choose_template(tokenizer, plain_template)
        self._special_ids = _special_token_ids(tokenizer)
        self._prepend_bos = _tokenizer_adds_bos(tokenizer)
        logger.debug(
            "rendering with the %s template (sha256 %s), max_length %d",
            "plain" if self.plain_template else "chat",
            self.template_sha256[:12],
            max_length,
        )

    @property
    def template_sha256(self) -> str:
        """SHA-256 hex digest of the template text in use, chat or plain."""
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()

    def render(self, messages) -> RenderedSample:
        """Render, tokenize, label and truncate one sample's messages."""
        roles, contents = _message_fields(messages)
        text, spans = self._render_text(roles, contents)
        input_ids, offsets = self._tokenize(text)
        parts = self._label(input_ids, offsets, spans)
        if RESPONSE not in parts:
            raise RenderError(
                f"sample has no response tokens among its {len(parts)} tokens: its assistant content is "
                "missing, empty, or only special tokens, which count as template. "
                "Give it an assistant message with ordinary text."
            )
        return self._truncate(input_ids, parts)

    def _apply_template(self, roles: list[str], contents: list[str]) -> str:
        conversation = [{"role": r, "content": c} for r, c in zip(roles, contents)]
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.template, tokenize=False, add_generation_prompt=False
        )

    def _render_text(self, roles: list[str], contents: list[str]) -> tuple[str, list[_ContentSpan]]:
        """Render the sample and locate each content as a character span of the rendering."""
        sentinels = [f"{SENTINEL_PREFIX}{k}>>" for k in range(len(contents))]
        skeleton = self._apply_template(roles, sentinels)
        text = self._apply_template(roles, contents)

        # Splice the real contents into the skeleton in the order the sentinels appear.
        located = sorted(
            (_find_sentinel(skeleton, sentinels[k], roles[k], k), k) for k in range(len(contents))
        )
        pieces, spans, cursor, length = [], [], 0, 0
        for position, k in located:
            pieces.append(skeleton[cursor:position])
            length += position - cursor
            spans.append(_ContentSpan(length, length + len(contents[k]), ROLE_PARTS[roles[k]]))
            pieces.append(contents[k])
            length += len(contents[k])
            cursor = position + len(sentinels[k])
        pieces.append(skeleton[cursor:])

        if "".join(pieces) != text:
            raise RenderError(
                "the chat template changes message contents (for example it strips whitespace), "
                f"so content spans cannot be located. {PLAIN_TEMPLATE_HINT}"
            )
        return text, spans

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokenize the rendering once, with character offsets and the BOS the template lacks."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        offsets = [tuple(pair) for pair in encoding["offset_mapping"]]
        bos_id = self.tokenizer.bos_token_id
        if self._prepend_bos and (not input_ids or input_ids[0] != bos_id):
            input_ids.insert(0, bos_id)
            offsets.insert(0, (0, 0))
        return input_ids, offsets

    def _label(
        self, input_ids: list[int], offsets: list[tuple[int, int]], spans: list[_ContentSpan]
    ) -> list[int]:
        """Give each token the part of the content span that contains it, else TEMPLATE."""
        starts = [span.start for span in spans]
        parts = []
        for token_id, (start, end) in zip(input_ids, offsets):
            index = bisect.bisect_right(starts, start) - 1
            inside = index >= 0 and start < end <= spans[index].end
            if inside and token_id not in self._special_ids:
                parts.append(spans[index].part)
            else:
                parts.append(TEMPLATE)
        return parts

    def _truncate(self, input_ids: list[int], parts: list[int]) -> RenderedSample:
        """Cut prompt tokens from the front, then response tokens from the back, to max_length."""
        excess = len(input_ids) - self.max_length
        if excess <= 0:
            return RenderedSample(input_ids, parts, truncated=False)

        template_count = parts.count(TEMPLATE)
        if template_count >= self.max_length:
            raise RenderError(
                f"sample needs {template_count} template tokens plus at least 1 response token, "
                f"but max_length is {self.max_length}. Raise max_length or drop turns from the sample."
            )

        # Removing every prompt token leaves template + response tokens, and template_count is
        # below max_length, so at least one response token always survives the cut below.
        prompt_positions = [i for i, part in enumerate(parts) if part == PROMPT]
        dropped = set(prompt_positions[:excess])
        excess -= len(dropped)
        if excess > 0:
            response_positions = [i for i, part in enumerate(parts) if part == RESPONSE]
            dropped.update(response_positions[len(response_positions) - excess :])

        kept_positions = [i for i in range(len(input_ids)) if i not in dropped]
        return RenderedSample(
            [input_ids[i] for i in kept_positions], [parts[i] for i in kept_positions], truncated=True
        )


def _choose_template(tokenizer, plain_template: bool | None) -> tuple[bool, str]:
    """Return whether the plain template is used, and the template text."""
    chat_template = tokenizer.chat_template
    if isinstance(chat_template, Mapping):
        chat_template = chat_template.get("default")
    if plain_template is None:
        plain_template = chat_template is None
    if plain_template:
        return True, PLAIN_TEMPLATE
    if chat_template is None:
        raise RenderError(f"tokenizer {tokenizer.name_or_path!r} has no chat template. {PLAIN_TEMPLATE_HINT}")
    return False, chat_template


def _special_token_ids(tokenizer) -> frozenset[int]:
    """Collect the ids of special tokens, which are TEMPLATE even inside a content span."""
    ids = set(tokenizer.all_special_ids)
    ids.update(token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(ids)


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Return whether the tokenizer puts a BOS token in front of text that it encodes."""
    if tokenizer.bos_token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == tokenizer.bos_token_id


def _message_fields(messages) -> tuple[list[str], list[str]]:
    """Return the roles and contents of messages given as objects or as dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise RenderError(f"messages must be a non-empty list of messages, got {type(messages).__name__}")
    roles, contents = [], []
    for k, message in enumerate(messages):
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        else:
            role, content = getattr(message, "role", None), getattr(message, "content", None)
        if role not in ROLE_PARTS:
            raise RenderError(f"message {k}: role {role!r} is invalid. Use one of {', '.join(ROLE_PARTS)}.")
        if not isinstance(content, str):
            raise RenderError(f"message {k}: content must be a string, got {type(content).__name__}")
        if SENTINEL_PREFIX in content:
            raise RenderError(
                f"message {k}: content contains the reserved marker {SENTINEL_PREFIX!r}. "
                "Remove the marker from the content."
            )
        roles.append(role)
        contents.append(content)
    return roles, contents


def _find_sentinel(skeleton: str, sentinel: str, role: str, k: int) -> int:
    """Return the position of the one occurrence of a sentinel in the skeleton."""
    count = skeleton.count(sentinel)
    if count != 1:
        raise RenderError(
            f"the chat template renders the content of message {k} ({role}) {count} times instead "
            f"of once, so content spans cannot be located. {PLAIN_TEMPLATE_HINT}"
        )
    return skeleton.index(sentinel)
