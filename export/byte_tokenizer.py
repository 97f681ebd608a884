"""A byte-level tokenizer for the random-weight models, so they can be driven with text like a real model."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Specials first, then the 256 byte symbols, then unused filler tokens up to ``vocab_size``."""
    symbols = list(pre_tokenizers.ByteLevel.alphabet())
    symbols.sort()
    filler = [f"<unused{i}>" for i in range(vocab_size - len(SPECIAL_TOKENS) - len(symbols))]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + symbols + filler)}
    if len(vocab) != vocab_size:
        raise ValueError(f"a byte tokenizer needs a vocab of at least {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS + filler)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
