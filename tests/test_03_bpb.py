"""TOKENIZER + BPB: byte counts exactly as the challenge counts them (on the project's own byte-fallback tokenizer,
and on the challenge's sp8192 where ../shared is present)."""
import math

import torch

import train_gpt
from conftest import SP8192, require_shared


TEXTS = ["Hello world, naïve café: 日本語 text with  double spaces and digits 12345.",
         "Ternary weights (−1/0/+1) über alles — ✓ émoji 🙂 and tabs\tinside.", "plain ascii"]


def test_own_tokenizer_has_byte_fallback_pieces(own_tokenizer):
    """The fixture's tokenizer is what the tests need: BOS id 1, and 256 byte pieces that count 1 byte each."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(own_tokenizer))
    assert sp.bos_id() == 1 and sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256
    tables = train_gpt.build_byte_tables(sp, sp.vocab_size())
    assert all(int(tables[0][i]) == 1 for i in range(sp.vocab_size()) if sp.is_byte(i))
    assert any(sp.is_byte(i) for i in sp.encode(TEXTS[1])), "the test text never falls back to bytes"


def test_byte_count_equals_utf8_length_with_byte_fallback(own_tokenizer):
    """Over documents after a BOS each, the counted bytes equal the UTF-8 length of the texts (multi-byte characters
    encoded as byte pieces count once per byte; the document's first '▁' counts nothing)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(own_tokenizer))
    tables = train_gpt.build_byte_tables(sp, sp.vocab_size())
    ids = torch.tensor([i for text in TEXTS for i in [1] + sp.encode(text)])
    expected = sum(len(sp.decode(sp.encode(text)).encode()) for text in TEXTS)
    assert int(train_gpt.token_bytes(ids[:-1], ids[1:], tables).sum()) == expected


def test_bpb_matches_hand_count_with_byte_fallback_bos_and_control():
    """BOS start, '▁th' after BOS (no space byte), byte-fallback (1 byte), '▁th' mid-text (+1 space),
    a control token (0 bytes), '▁th' after it (no space byte), 'ouse' (4)."""
    require_shared()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    assert sp.id_to_piece(300) == "\u2581th" and sp.id_to_piece(69) == "<0x41>" and sp.id_to_piece(1000) == "ouse"
    tables = train_gpt.build_byte_tables(sp, 8192)
    ids = torch.tensor([1, 300, 69, 300, 2, 300, 1000])
    per_token = train_gpt.token_bytes(ids[:-1], ids[1:], tables)
    assert per_token.tolist() == [2, 1, 3, 0, 2, 4]
    nll = torch.full((6,), 0.7, dtype=torch.float64)
    assert math.isclose(train_gpt.bits_per_byte(nll.sum(), per_token.sum()), 6 * 0.7 / (math.log(2) * 12))


def test_byte_count_of_a_real_text_equals_its_utf8_length():
    """Summed over a document after BOS, the counted bytes equal the UTF-8 length of the text."""
    require_shared()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    text = "Hello world, naïve café: 日本語 text with  double spaces and digits 12345."
    ids = torch.tensor([1] + sp.encode(text))
    tables = train_gpt.build_byte_tables(sp, 8192)
    assert int(train_gpt.token_bytes(ids[:-1], ids[1:], tables).sum()) == len(sp.decode(sp.encode(text)).encode())


def test_unknown_and_pad_ids_count_zero_bytes_and_swallow_the_next_space():
    """'<unk>' (id 3) and the control '<pad>' (id 0) count 0 bytes and are boundaries: '▁th' after either counts
    2 bytes (no space byte), mid-text it counts 3; hand count: BOS, ▁th 2, unk 0, ▁th 2, ▁th 3, pad 0, ▁th 2, ouse 4.
    (Neither tokenizer has unused ids; ids past the tokenizer's vocab are boundaries with 0 bytes.)"""
    require_shared()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    assert sp.is_unknown(3) and sp.id_to_piece(3) == "<unk>" and sp.is_control(0) and sp.id_to_piece(0) == "<pad>"
    assert sp.id_to_piece(300) == "\u2581th" and sp.id_to_piece(1000) == "ouse"
    tables = train_gpt.build_byte_tables(sp, 8200)
    ids = torch.tensor([1, 300, 3, 300, 300, 0, 300, 1000, 8195, 300])
    assert train_gpt.token_bytes(ids[:-1], ids[1:], tables).tolist() == [2, 0, 2, 3, 0, 2, 4, 0, 2]
    assert tables[0][[0, 1, 2, 3, 8195]].tolist() == [0] * 5 and tables[2][[0, 1, 2, 3, 8195]].all()
