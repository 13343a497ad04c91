"""A character-level tokenizer for the tiny model, built on the `tokenizers` library.

Every printable ASCII character and the newline is one token; anything else maps to ``<unk>``. Because it is
a plain ``PreTrainedTokenizerFast`` saved as ``tokenizer.json``, ``AutoTokenizer.from_pretrained(path)``
loads it with no registration and no remote code.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, MASK, UNK = "<pad>", "<bos>", "<eos>", "<mask>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, MASK, UNK)  # ids 0..4, in this order
CHARACTERS = "\n" + "".join(c for c in string.printable if c.isprintable())  # newline + 95 printable


def build_char_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every single character is its own "word"; special tokens are matched before this runs.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        mask_token=MASK,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
