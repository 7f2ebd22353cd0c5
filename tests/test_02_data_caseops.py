"""DATA, CaseOps: the case transform is a bijection, lower-cases every plain letter, and with a tokenizer trained on
transformed text the BPB byte total is exactly the UTF-8 length of the original text."""
import json
import random
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, SHARED

sys.path.insert(0, str(REPO / "data"))
import caseops  # noqa: E402
from tokenize_corpus import DataError, read_shard, tokenize_corpus  # noqa: E402

SAMPLES = ["The NASA probe reached Mars.", "McDonald's iPhone eBay", "ÉCOLE Élève straße STRAßE ǅemal İstanbul",
           "A I OK x", "", "  spaced  out \n\nnew lines\t", "digits 42ABC x2Y", "ΑΒΓ Δέλτα ДОМ Дом",
           "\ue000 literal \ue001operators\ue003", "UPPER\ue002CASE", "日本語 Text", "ǈ title-case digraph"]


def random_text(rng, n):
    alphabet = "aAbBzZ ßẞǅǆİıÉé'-\n\ue000\ue001\ue002\ue003ΣσςДд1_"
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_decode_inverts_encode_on_every_string():
    rng = random.Random(0)
    for text in SAMPLES + [random_text(rng, rng.randint(0, 40)) for _ in range(3000)]:
        assert caseops.decode(caseops.encode(text)) == text, repr(text)


def test_encode_lower_cases_every_plain_letter_and_keeps_byte_lengths():
    for text in SAMPLES:
        encoded = caseops.encode(text)
        assert not any(caseops.plain_upper(c) for c in encoded), repr(encoded)
        stripped = "".join(c for c in encoded if c not in caseops.OPERATORS)
        escaped = sum(c in caseops.OPERATORS for c in text)  # each escaped operator keeps its own character
        assert len(stripped.encode()) + 3 * escaped == len(text.encode())
    assert caseops.encode("The NASA probe") == "\ue000the \ue001nasa probe"
    assert caseops.encode("McDonald") == "\ue002mc\ue002donald"


def test_trainer_operator_pieces_are_the_transforms():
    assert train_gpt.CASEOPS_OPERATORS == caseops.OPERATORS


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """A CaseOps tokenizer (vocab 512) trained on the project's own text, and that text tokenized with --caseops,
    the val split being 40 documents of real mixed-case text (the shared FineWeb val when present)."""
    tmp = tmp_path_factory.mktemp("caseops")
    sources = train_gpt.own_text_files(REPO)
    model = caseops.train_tokenizer([str(p) for p in sources], 512, tmp / "caseops_512.model", log=lambda *a: None)
    val_file = SHARED / "corpus" / "fineweb.val.jsonl"
    if val_file.is_file():
        docs = [json.loads(line)["text"] for line in val_file.read_text().splitlines()[:40]]
    else:
        docs = [p for path in sources for p in path.read_text().split("\n\n") if p.strip()][:40]
    val = tmp / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp / "data"
    meta = tokenize_corpus([str(p) for p in sources], str(model), str(out), val_file=str(val), workers=1, caseops=True,
                           log=lambda *a: None)
    return model, out, docs, meta


def test_bpb_bytes_of_caseops_tokens_are_the_original_utf8_bytes(caseops_data):
    """Over the val shard, the trainer's byte tables count exactly sum(len(doc.encode())) of the original documents,
    and every document decodes (SentencePiece, then the inverse transform) to its original text byte for byte."""
    import sentencepiece as spm
    model, out, docs, meta = caseops_data
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert meta["caseops"] is True and train_gpt.is_caseops_tokenizer(sp)
    tokens = torch.from_numpy(np.concatenate([read_shard(p) for p in sorted(out.glob("fineweb_val_*.bin"))]).astype(np.int64))
    tables = train_gpt.build_byte_tables(sp, sp.vocab_size())
    counted = int(train_gpt.token_bytes(tokens[:-1], tokens[1:], tables).sum())
    assert counted == sum(len(d.encode("utf-8")) for d in docs)
    starts = (tokens == sp.bos_id()).nonzero().flatten().tolist() + [len(tokens)]
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        assert caseops.decode(sp.decode(tokens[a + 1:b].tolist())) == docs[k]
    assert any(caseops.TITLE in sp.id_to_piece(int(t)) for t in tokens[:2000]), "no operator in the val stream"


def test_caseops_tokenizer_and_data_must_agree(caseops_data, own_tokenizer, tmp_path):
    model, out, _, _ = caseops_data
    with pytest.raises(DataError, match="--caseops"):
        tokenize_corpus([str(REPO / "README.md")], str(model), str(tmp_path / "a"), val_docs=2, workers=1, log=lambda *a: None)
    with pytest.raises(DataError, match="no case-operator"):
        tokenize_corpus([str(REPO / "README.md")], str(own_tokenizer), str(tmp_path / "b"), val_docs=2, workers=1,
                        caseops=True, log=lambda *a: None)
    meta = json.loads((out / "meta.json").read_text())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "meta.json").write_text(json.dumps(dict(meta, caseops=False)))
    with pytest.raises(train_gpt.ConfigError, match="CaseOps tokenizer"):
        train_gpt.check_data_matches_tokenizer(tmp_path / "c", model, meta["vocab_size"])
