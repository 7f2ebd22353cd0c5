"""DATA: the shard reader memory-maps and refuses every corrupt input with an error naming the file; the loader's
global batch is independent of the world size; the held-out tail is never trained on; tokenizer/data checks."""
import numpy as np
import pytest

import train_gpt
from conftest import write_shard


def test_shard_roundtrip(tmp_path):
    """Tokens written in the challenge format read back identical."""
    tokens = np.random.default_rng(0).integers(0, 1024, size=1000)
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert np.array_equal(train_gpt.load_shard(tmp_path / "fineweb_train_000000.bin", 1024), tokens)


def _corrupt(path, how):
    write_shard(path, np.arange(100) % 50)
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0] ^= 0xFF
    elif how == "version":
        data[4] = 7
    elif how == "truncated":
        data = data[:-10]
    elif how == "short":
        data = data[:100]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, needle", [("magic", "magic"), ("version", "version"), ("truncated", "bytes"), ("short", "header")])
def test_corrupt_shard_is_an_error_naming_the_file(tmp_path, how, needle):
    """Bad magic, bad version, wrong size and a cut header each raise ConfigError with the path."""
    path = tmp_path / "fineweb_val_000000.bin"
    _corrupt(path, how)
    with pytest.raises(train_gpt.ConfigError, match=needle) as error:
        train_gpt.load_shard(path, 1024)
    assert str(path) in str(error.value)


def test_token_id_at_or_above_vocab_is_an_error(tmp_path):
    """A token id >= VOCAB_SIZE (shards from a bigger tokenizer) is refused, naming file and position."""
    path = tmp_path / "fineweb_train_000000.bin"
    tokens = np.zeros(500, dtype=np.int64)
    tokens[321] = 1024
    write_shard(path, tokens)
    with pytest.raises(train_gpt.ConfigError, match="position 321") as error:
        train_gpt.load_shard(path, 1024)
    assert str(path) in str(error.value)


def test_missing_shards_name_the_fix(tmp_path):
    """An empty DATA_PATH says where to get data."""
    with pytest.raises(train_gpt.ConfigError, match="tokenize_corpus"):
        train_gpt.shard_paths(tmp_path, "train")


def test_loader_global_batch_is_independent_of_world_size(tmp_path):
    """Two ranks with one micro-batch each see exactly the tokens one rank sees in two micro-batches."""
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5000) % 1000)
    paths = [tmp_path / "fineweb_train_000000.bin"]
    import torch
    single = train_gpt.DistributedTokenLoader(paths, 1024, 0, 1, torch.device("cpu"))
    ranks = [train_gpt.DistributedTokenLoader(paths, 1024, r, 2, torch.device("cpu")) for r in range(2)]
    for _ in range(3):
        one = [single.next_batch(128, 64)[0] for _ in range(2)]
        two = [loader.next_batch(256, 64)[0] for loader in ranks]
        assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_training_stream_never_reads_the_heldout_tail(tmp_path):
    """The last `holdout` tokens (across shards) are cut from the training stream, which wraps before them; the
    calibration / temperature slice is exactly that tail."""
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(100))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(100, 150))
    paths = sorted(tmp_path.glob("fineweb_train_*.bin"))
    stream = train_gpt.TokenStream(paths, 1024, holdout=70)
    assert np.array_equal(stream.take(160), np.concatenate([np.arange(80), np.arange(80)]))
    assert np.array_equal(train_gpt.train_tail(tmp_path, 1024, 70).numpy(), np.arange(80, 150))
    with pytest.raises(train_gpt.ConfigError, match="CALIB_TOKENS, TEMP_FIT_TOKENS"):
        train_gpt.TokenStream(paths, 1024, holdout=149)


def test_heldout_tail_is_what_the_enabled_features_read():
    """Nothing is held out by default; calibration holds out CALIB_TOKENS + 1, temperature fitting TEMP_FIT_TOKENS."""
    from conftest import tiny_config
    held = lambda **o: train_gpt.heldout_tokens((c := tiny_config(**o)).export, c.eval)
    assert held() == 0
    assert held(TERNARY_SCALE_SEARCH=1, CALIB_TOKENS=4096) == 4097
    assert held(ENGRAM_PRUNE_MIN_HITS=1, CALIB_TOKENS=4096) == 4097
    assert held(TEMP_SCALING=1, TEMP_FIT_TOKENS=9000, GPTQ_LITE_ENABLED=1, CALIB_TOKENS=4096) == 9000


def test_tokenizer_vocab_mismatch_is_an_error(own_tokenizer):
    """A tokenizer whose size differs from VOCAB_SIZE is refused (not a warning)."""
    with pytest.raises(train_gpt.ConfigError, match="VOCAB_SIZE=8192"):
        train_gpt.load_tokenizer(str(own_tokenizer), 8192)


def test_data_meta_with_other_tokenizer_is_an_error(tmp_path, own_tokenizer):
    """meta.json that names another tokenizer (sha256) than TOKENIZER_PATH is refused."""
    import json
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 1024, "tokenizer_sha256": "0" * 64, "tokenizer_path": "x"}))
    with pytest.raises(train_gpt.ConfigError, match="sha256"):
        train_gpt.check_data_matches_tokenizer(tmp_path, own_tokenizer, 1024)
    with pytest.raises(train_gpt.ConfigError, match="vocab size"):
        train_gpt.check_data_matches_tokenizer(tmp_path, own_tokenizer, 8192)


def test_ranks_with_other_val_data_or_tokenizer_are_refused(own_tokenizer, monkeypatch):
    """Each node reads its own disk: a rank whose tokenizer or val tokens differ from rank 0's is an error."""
    import torch
    val = torch.arange(100)
    train_gpt.check_ranks_agree(own_tokenizer, val, train_gpt.Dist())  # world size 1: agrees with itself
    monkeypatch.setattr(train_gpt, "broadcast_object", lambda mine: ("rank 0's", mine[1]))
    with pytest.raises(train_gpt.ConfigError, match="differ from rank 0"):
        train_gpt.check_ranks_agree(own_tokenizer, val, train_gpt.Dist(rank=1, world_size=2))


def test_official_folder_name_with_other_vocab_is_an_error(tmp_path):
    """Without meta.json, an official folder name (fineweb10B_sp1024) must agree with VOCAB_SIZE."""
    folder = tmp_path / "fineweb10B_sp1024"
    folder.mkdir()
    train_gpt.check_data_matches_tokenizer(folder, "unused", 1024)
    with pytest.raises(train_gpt.ConfigError, match="sp1024"):
        train_gpt.check_data_matches_tokenizer(folder, "unused", 8192)
