"""TOKENIZER + BPB: byte counts exactly as the challenge counts them."""
import math

import torch

import train_gpt
from conftest import SP8192, require_shared


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
