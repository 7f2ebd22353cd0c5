"""CaseOps: a lossless, bijective case transform for tokenization, and a tokenizer trained on transformed text.

Text is lower-cased and the case put back by operator characters (Unicode private-use code points, which real text
almost never holds; when it does they are escaped), so "The NASA probe" and "the nasa probe" share their word
pieces:

    TITLE  U+E000  the next word (a maximal run of letters) starts with an upper-case letter, the rest lower
    UPPER  U+E001  every letter of the next word is upper case (words of 2+ letters)
    CHAR   U+E002  the next character is upper case (mixed-case words: "McDonald" -> CHAR m c CHAR donald)
    ESC    U+E003  the next character is literal (an operator character that was in the input)

Only "plain-cased" letters are transformed: c.lower() is one character with c.lower().upper() == c and the same
UTF-8 length, so lower-casing never changes a byte count; anything else (e.g. "ß", title-case digraphs) stays as
it is. decode(encode(text)) == text for every string (tests/test_02_data_caseops.py).

Bytes: every operator is a user-defined piece of the tokenizer and counts 0 bytes in the trainer's byte tables,
every other piece its own bytes, so the BPB denominator of transformed text is the UTF-8 length of the original
text exactly (tested on the val split).

    python data/caseops.py train-tokenizer --inputs '../shared/corpus/fineweb.train.jsonl.xz' --vocab 1024 \\
        --out data/tokenizers/caseops_1024_bpe.model
    python data/tokenize_corpus.py --caseops --tokenizer data/tokenizers/caseops_1024_bpe.model ...
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

TITLE, UPPER, CHAR, ESC = "\ue000", "\ue001", "\ue002", "\ue003"
OPERATORS = (TITLE, UPPER, CHAR, ESC)
WORD = re.compile(r"[^\W\d_]+")  # a maximal run of letters


def plain_upper(c: str) -> bool:
    """An upper-case letter that lower-cases to one letter of the same UTF-8 length and back to itself."""
    low = c.lower()
    return low != c and len(low) == 1 and low.upper() == c and len(low.encode()) == len(c.encode())


def encode_word(word: str) -> str:
    if not any(plain_upper(c) for c in word):
        return word
    if len(word) >= 2 and all(plain_upper(c) for c in word):
        return UPPER + word.lower()
    if plain_upper(word[0]) and not any(plain_upper(c) for c in word[1:]):
        return TITLE + word[0].lower() + word[1:]
    return "".join(CHAR + c.lower() if plain_upper(c) else c for c in word)


def encode(text: str) -> str:
    """Lower-cased text with case operators (operator characters of the input escaped)."""
    text = "".join(ESC + c if c in OPERATORS else c for c in text)
    return WORD.sub(lambda m: encode_word(m.group()), text)


def decode(text: str) -> str:
    """The inverse of encode."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == ESC and i + 1 < n:
            out.append(text[i + 1])
            i += 2
        elif c == CHAR and i + 1 < n:
            out.append(text[i + 1].upper())
            i += 2
        elif c in (TITLE, UPPER):
            m = WORD.match(text, i + 1)
            word = m.group() if m else ""
            out.append(word.upper() if c == UPPER else word[:1].upper() + word[1:])
            i += 1 + len(word)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def train_tokenizer(inputs, vocab_size, out, max_docs=None, log=print, plain=False):
    """A SentencePiece BPE model trained on encode(text) of `inputs`, the operators as user-defined pieces, no
    normalization (so that decoding gives the transformed text back exactly), byte fallback, BOS id 1 as the
    challenge's tokenizers. plain=True: the same on the untransformed text, without operators (the control that
    isolates the transform's effect from the tokenizer's training data)."""
    import sentencepiece as spm
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tokenize_corpus import expand_inputs, iterate_documents
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as handle:
        for k, doc in enumerate(iterate_documents(expand_inputs(inputs), False, log)):
            if max_docs is not None and k >= max_docs:
                break
            handle.write((doc if plain else encode(doc)).replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.train(
        input=handle.name, model_prefix=str(out.with_suffix("")), vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity", split_digits=True,
        remove_extra_whitespaces=False, user_defined_symbols=[] if plain else list(OPERATORS), pad_id=0, bos_id=1, eos_id=2, unk_id=3, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, minloglevel=2)
    Path(handle.name).unlink()
    log(f"caseops: tokenizer {out} vocab:{vocab_size} transform:{not plain}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-tokenizer", help="train a SentencePiece model on transformed text")
    train.add_argument("--inputs", nargs="+", required=True)
    train.add_argument("--vocab", type=int, default=1024)
    train.add_argument("--out", required=True)
    train.add_argument("--max-docs", type=int, default=None)
    train.add_argument("--plain", action="store_true", help="the control: same training on untransformed text")
    sub.add_parser("roundtrip", help="stdin -> encode -> decode -> check equality (exit 1 if not)")
    options = parser.parse_args(argv)
    if options.command == "train-tokenizer":
        train_tokenizer(options.inputs, options.vocab, options.out, options.max_docs, plain=options.plain)
        return 0
    text = sys.stdin.read()
    return 0 if decode(encode(text)) == text else 1


if __name__ == "__main__":
    sys.exit(main())
