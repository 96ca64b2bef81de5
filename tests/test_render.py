"""Tests for trimdb.render: content spans, templates and truncation."""

from __future__ import annotations

import copy
import hashlib
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import processors

from tests.tiny import DEFAULT_SYSTEM_PROMPT, EOS, build_tiny_tokenizer
from trimdb.errors import RenderError, SettingsError
from trimdb.render import PLAIN_TEMPLATE, PROMPT, RESPONSE, TEMPLATE, Renderer

SMOLLM2_DIR = Path.home() / ".cache" / "trimdb" / "models" / "SmolLM2-135M-Instruct"

USER = "What is the capital of France?"
ASSISTANT = "The capital of France is Paris."
PAIR = [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}]


def content_runs(tokenizer, sample) -> list[tuple[int, str]]:
    """Return (part, decoded text) for each run of consecutive non-template tokens."""
    runs = []
    for part, group in itertools.groupby(zip(sample.parts, sample.input_ids), key=lambda pair: pair[0]):
        if part != TEMPLATE:
            runs.append((part, tokenizer.decode([token_id for _, token_id in group])))
    return runs


def ids_of(sample, part: int) -> list[int]:
    return [token_id for token_id, code in zip(sample.input_ids, sample.parts) if code == part]


TRIMMING_TEMPLATE = build_tiny_tokenizer().chat_template.replace(
    "message['content']", "(message['content'] | trim)"
)


def tokenizer_with_template(template: str):
    tokenizer = copy.deepcopy(build_tiny_tokenizer())
    tokenizer.chat_template = template
    return tokenizer


def test_render_pair_marks_exact_content():
    tokenizer = build_tiny_tokenizer()
    sample = Renderer(tokenizer).render(PAIR)

    assert content_runs(tokenizer, sample) == [(PROMPT, USER), (RESPONSE, ASSISTANT)]
    assert len(sample.parts) == len(sample.input_ids)
    assert sample.truncated is False


def test_render_full_text_matches_chat_template():
    tokenizer = build_tiny_tokenizer()
    sample = Renderer(tokenizer).render(PAIR)

    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(PAIR, tokenize=False)


def test_render_injected_system_prompt_is_template():
    tokenizer = build_tiny_tokenizer()
    sample = Renderer(tokenizer).render(PAIR)

    template_text = tokenizer.decode(ids_of(sample, TEMPLATE))
    assert DEFAULT_SYSTEM_PROMPT in template_text
    assert DEFAULT_SYSTEM_PROMPT not in tokenizer.decode(ids_of(sample, PROMPT))


def test_render_sample_system_message_is_prompt():
    tokenizer = build_tiny_tokenizer()
    system = "You answer in one short sentence."
    sample = Renderer(tokenizer).render([{"role": "system", "content": system}, *PAIR])

    assert content_runs(tokenizer, sample) == [(PROMPT, system), (PROMPT, USER), (RESPONSE, ASSISTANT)]
    assert DEFAULT_SYSTEM_PROMPT not in tokenizer.decode(sample.input_ids)


def test_render_multi_turn_spans():
    tokenizer = build_tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 17 and 25."},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "Now divide it by 6."},
        {"role": "assistant", "content": "It is 7."},
    ]
    sample = Renderer(tokenizer).render(messages)

    expected = [(PROMPT, "Be brief."), (PROMPT, "Add 17 and 25."), (RESPONSE, "42")]
    expected += [(PROMPT, "Now divide it by 6."), (RESPONSE, "It is 7.")]
    assert content_runs(tokenizer, sample) == expected


def test_render_accepts_message_objects():
    tokenizer = build_tiny_tokenizer()
    renderer = Renderer(tokenizer)
    objects = [SimpleNamespace(role=m["role"], content=m["content"]) for m in PAIR]

    assert renderer.render(objects) == renderer.render(PAIR)


def test_render_unicode_content_is_exact():
    tokenizer = build_tiny_tokenizer()
    user = "Translate: ünïcödé 日本語 😀, then stop."
    sample = Renderer(tokenizer).render([{"role": "user", "content": user}, PAIR[1]])

    assert content_runs(tokenizer, sample) == [(PROMPT, user), (RESPONSE, ASSISTANT)]


def test_render_straddling_token_is_template():
    # The header ends in a space, and the tokenizer merges that space with the first word of the
    # content into the token " is", which crosses the content boundary.
    template = (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    )
    tokenizer = tokenizer_with_template(template)
    sample = Renderer(tokenizer).render([{"role": "user", "content": "is it?"}, PAIR[1]])

    tokens = tokenizer.convert_ids_to_tokens(sample.input_ids)
    assert "Ġis" in tokens
    assert sample.parts[tokens.index("Ġis")] == TEMPLATE
    assert content_runs(tokenizer, sample)[0] == (PROMPT, " it?")


def test_render_special_token_in_content_is_template():
    tokenizer = build_tiny_tokenizer()
    user = "Repeat <|im_end|> back to me."
    sample = Renderer(tokenizer).render([{"role": "user", "content": user}, PAIR[1]])

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [(PROMPT, "Repeat "), (PROMPT, " back to me.")] == content_runs(tokenizer, sample)[:2]
    assert im_end not in ids_of(sample, PROMPT)


def test_render_plain_template_without_chat_template():
    tokenizer = build_tiny_tokenizer(chat_template=False)
    renderer = Renderer(tokenizer)
    sample = renderer.render(PAIR)

    expected_text = f"### User:\n{USER}\n\n### Assistant:\n{ASSISTANT}{EOS}\n\n"
    assert renderer.plain_template is True
    assert tokenizer.decode(sample.input_ids) == expected_text
    assert content_runs(tokenizer, sample) == [(PROMPT, USER), (RESPONSE, ASSISTANT)]


def test_render_plain_template_forced_over_chat():
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, *PAIR]
    sample = Renderer(tokenizer, plain_template=True).render(messages)

    assert tokenizer.decode(sample.input_ids).startswith("### System:\nBe brief.\n\n### User:\n")
    assert content_runs(tokenizer, sample) == [(PROMPT, "Be brief."), (PROMPT, USER), (RESPONSE, ASSISTANT)]


def test_render_plain_template_starts_with_bos():
    tokenizer = copy.deepcopy(build_tiny_tokenizer(chat_template=False))
    tokenizer.bos_token = "<|im_start|>"
    sample = Renderer(tokenizer).render(PAIR)

    assert sample.input_ids[0] == tokenizer.bos_token_id
    assert sample.input_ids.count(tokenizer.bos_token_id) == 1
    assert sample.parts[0] == TEMPLATE


def test_render_prepends_bos_the_template_lacks():
    # The post-processor adds BOS to encoded text, as Llama tokenizers do, but the chat template
    # never writes it.
    tokenizer = copy.deepcopy(build_tiny_tokenizer())
    tokenizer.bos_token = EOS
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, tokenizer.convert_tokens_to_ids(EOS))]
    )
    plain = Renderer(build_tiny_tokenizer()).render(PAIR)
    sample = Renderer(tokenizer).render(PAIR)

    assert sample.input_ids == [tokenizer.bos_token_id, *plain.input_ids]
    assert sample.parts == [TEMPLATE, *plain.parts]


def test_render_no_truncation_at_exact_length():
    tokenizer = build_tiny_tokenizer()
    full = Renderer(tokenizer).render(PAIR)
    sample = Renderer(tokenizer, max_length=len(full.input_ids)).render(PAIR)

    assert sample == full


def test_render_truncation_cuts_prompt_first():
    tokenizer = build_tiny_tokenizer()
    full = Renderer(tokenizer).render(PAIR)
    max_length = len(full.input_ids) - 3
    sample = Renderer(tokenizer, max_length=max_length).render(PAIR)

    assert sample.truncated is True
    assert len(sample.input_ids) == max_length
    assert ids_of(sample, PROMPT) == ids_of(full, PROMPT)[3:]
    assert ids_of(sample, RESPONSE) == ids_of(full, RESPONSE)
    assert ids_of(sample, TEMPLATE) == ids_of(full, TEMPLATE)


def test_render_truncation_cuts_earliest_prompt_content():
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, *PAIR]
    full = Renderer(tokenizer).render(messages)
    system_tokens = len(tokenizer.encode("Be brief.", add_special_tokens=False))
    sample = Renderer(tokenizer, max_length=len(full.input_ids) - system_tokens).render(messages)

    assert content_runs(tokenizer, sample) == [(PROMPT, USER), (RESPONSE, ASSISTANT)]


def test_render_truncation_cuts_response_end():
    tokenizer = build_tiny_tokenizer()
    full = Renderer(tokenizer).render(PAIR)
    template_count = full.parts.count(TEMPLATE)
    sample = Renderer(tokenizer, max_length=template_count + 2).render(PAIR)

    assert sample.truncated is True
    assert ids_of(sample, PROMPT) == []
    assert ids_of(sample, RESPONSE) == ids_of(full, RESPONSE)[:2]
    assert ids_of(sample, TEMPLATE) == ids_of(full, TEMPLATE)


def test_render_template_over_max_length_raises():
    tokenizer = build_tiny_tokenizer()
    template_count = Renderer(tokenizer).render(PAIR).parts.count(TEMPLATE)
    renderer = Renderer(tokenizer, max_length=template_count)

    pattern = rf"needs {template_count} template tokens .* max_length is {template_count}"
    with pytest.raises(RenderError, match=pattern):
        renderer.render(PAIR)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": USER}],
        [{"role": "user", "content": USER}, {"role": "assistant", "content": ""}],
    ],
    ids=["no-assistant", "empty-assistant"],
)
def test_render_without_response_raises(messages):
    with pytest.raises(RenderError, match="no response tokens"):
        Renderer(build_tiny_tokenizer()).render(messages)


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([], "non-empty list of messages"),
        ("hello", "non-empty list of messages"),
        ([{"role": "tool", "content": "x"}], r"message 0: role 'tool' is invalid"),
        ([{"role": "user", "content": None}], "message 0: content must be a string, got NoneType"),
        ([{"role": "user", "content": "<<TRIMDB_SENTINEL_0>>"}], "reserved marker"),
    ],
    ids=["empty", "string", "unknown-role", "none-content", "sentinel"],
)
def test_render_invalid_messages_raise(messages, pattern):
    with pytest.raises(RenderError, match=pattern):
        Renderer(build_tiny_tokenizer()).render(messages)


def test_render_trimming_template_raises_with_hint():
    renderer = Renderer(tokenizer_with_template(TRIMMING_TEMPLATE))
    messages = [{"role": "user", "content": "   padded question"}, PAIR[1]]

    with pytest.raises(RenderError, match=r"changes message contents.*--plain-template"):
        renderer.render(messages)


def test_render_trimming_template_accepts_clean_content():
    tokenizer = tokenizer_with_template(TRIMMING_TEMPLATE)
    sample = Renderer(tokenizer).render(PAIR)

    assert content_runs(tokenizer, sample) == [(PROMPT, USER), (RESPONSE, ASSISTANT)]


def test_render_template_dropping_content_raises():
    template = (
        "{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ message['content'] }}{% endif %}{% endfor %}"
    )
    renderer = Renderer(tokenizer_with_template(template))

    with pytest.raises(RenderError, match=r"content of message 0 \(system\) 0 times"):
        renderer.render([{"role": "system", "content": "Be brief."}, *PAIR])


def test_renderer_requires_chat_template_when_asked():
    with pytest.raises(RenderError, match="has no chat template.*--plain-template"):
        Renderer(build_tiny_tokenizer(chat_template=False), plain_template=False)


@pytest.mark.parametrize("max_length", [0, 1])
def test_renderer_rejects_tiny_max_length(max_length):
    with pytest.raises(SettingsError, match=f"max_length is {max_length}"):
        Renderer(build_tiny_tokenizer(), max_length=max_length)


def test_template_sha256_differs_chat_plain():
    tokenizer = build_tiny_tokenizer()
    chat = Renderer(tokenizer)
    plain = Renderer(tokenizer, plain_template=True)

    assert chat.template_sha256 == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    assert plain.template_sha256 == hashlib.sha256(PLAIN_TEMPLATE.encode()).hexdigest()
    assert chat.template_sha256 != plain.template_sha256


@pytest.mark.integration
@pytest.mark.skipif(not SMOLLM2_DIR.is_dir(), reason=f"{SMOLLM2_DIR} does not exist")
def test_render_smollm2_spans():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR, local_files_only=True)
    messages = [
        {"role": "user", "content": "Solve for x: 2x + 3 = 11.\nShow the steps."},
        {"role": "assistant", "content": "Subtract 3, then divide by 2: x = 4."},
    ]
    sample = Renderer(tokenizer).render(messages)

    expected = [(PROMPT, messages[0]["content"]), (RESPONSE, messages[1]["content"])]
    assert content_runs(tokenizer, sample) == expected
    assert DEFAULT_SYSTEM_PROMPT in tokenizer.decode(ids_of(sample, TEMPLATE))
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
