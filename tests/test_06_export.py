"""QUANTIZE + EXPORT: packing, exact fresh-process reload, determinism, corrupt-artifact errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, WARM_UP_SCRIPT, tiny_model


@pytest.mark.parametrize("count", [1, 4, 5, 6, 127, 128, 129, 1000, 4099])
def test_ternary_pack_roundtrip_is_exact(count):
    """base-3 and bitmask packing both roundtrip any length, including non-multiples of 5 and of 8."""
    codes = np.random.default_rng(count).integers(-1, 2, size=count).astype(np.int8)
    assert np.array_equal(train_gpt.unpack_base3(train_gpt.pack_base3(codes), count), codes)
    assert np.array_equal(train_gpt.unpack_bitmask(train_gpt.pack_bitmask(codes), count), codes)
    encoding, data = train_gpt.SCHEMES["ternary"].pack(codes)
    assert np.array_equal(train_gpt.SCHEMES["ternary"].unpack(encoding, data, count), codes)
    assert len(train_gpt.pack_base3(codes)) == -(-count // 5)


def test_sparse_codes_choose_the_bitmask():
    """Mostly-zero codes pack smaller as a bitmask, and the smaller one is kept."""
    codes = np.zeros(1000, dtype=np.int8)
    codes[::50] = 1
    assert train_gpt.SCHEMES["ternary"].pack(codes)[0] == "bitmask"


def _trained_tiny_model(**overrides):
    model = tiny_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


ARTIFACT_HASH_SCRIPT = """
import hashlib, sys, torch
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import train_gpt
from conftest import tiny_model
model = tiny_model(QUANT_EMBED="fp8", BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=64)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
print(hashlib.sha256(train_gpt.compress_payload(train_gpt.serialize_model(model))).hexdigest())
"""


def test_artifact_is_deterministic():
    """The same weights and config give a byte-identical artifact, in one process and across processes with
    different hash seeds (no dict or set order leaks into the bytes)."""
    model = _trained_tiny_model()
    assert train_gpt.compress_payload(train_gpt.serialize_model(model)) == train_gpt.compress_payload(train_gpt.serialize_model(model))
    script = WARM_UP_SCRIPT + ARTIFACT_HASH_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"))
    other_process = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONHASHSEED="1"), check=True,
                                   capture_output=True, text=True).stdout.strip()
    in_process = {}
    exec(ARTIFACT_HASH_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")).replace("print(", "digest = ("), in_process)
    assert other_process == in_process["digest"]  # this process's hash seed is its own (random), the other's is 1


def test_scalars_are_stored_fp16_once_rounded_and_losslessly_before():
    """Scalars that are not fp16-exact are stored fp32 (reload is still exact); round_scalars_to_fp16 rounds every
    route-'scalar' parameter, after which they all go to the artifact as fp16: half the bytes, reload exact."""
    model = _trained_tiny_model()
    scalar_numel = sum(p.numel() for p in model.parameters() if p.route == "scalar")
    before = train_gpt.export_report(model)
    assert before["fp32"] >= 4 * scalar_numel
    assert train_gpt.round_scalars_to_fp16(model) == sum(p.route == "scalar" for p in model.parameters())
    after = train_gpt.export_report(model)
    assert "fp32" not in after and after["fp16_scalars"] == (before["fp32"] + before.get("fp16_scalars", 0) * 2) // 2
    header, tensors = train_gpt.parse_payload(train_gpt.serialize_model(model), "memory")
    reloaded = dict(model.state_dict())
    for name, (scheme, arrays, _) in tensors.items():
        if scheme == "scalar":
            assert arrays[0].dtype == np.float16 and torch.equal(torch.from_numpy(arrays[0]).float(), reloaded[name])


RELOAD_SCRIPT = """
import sys, torch, json
sys.path.insert(0, {repo!r})
import train_gpt
x = torch.load({batch!r})
out = {{}}
for name in {names!r}:
    model = train_gpt.load_model_from_artifact({directory!r} + "/" + name + ".skc", "cpu").eval()
    with torch.no_grad():
        nll = model.token_nll(x[0], x[1])
    out[name] = (nll, {{n: m.quantize()[0].tolist() for n, m in model.named_modules() if isinstance(m, train_gpt.TernaryLinear)}})
torch.save(out, {result!r})
"""


def test_fresh_process_reload_is_exact_for_every_quant_embed(tmp_path):
    """One fresh process rebuilds each model (fp16, fp8, fp4 storage) from its artifact alone: ternary codes
    bit-identical, NLL identical."""
    torch.manual_seed(3)
    batch = (torch.randint(0, 1024, (2, 64)), torch.randint(0, 1024, (2, 64)))
    torch.save(batch, tmp_path / "batch.pt")
    models = {}
    for quant_embed in ("fp16", "fp8", "fp4"):
        models[quant_embed] = _trained_tiny_model(QUANT_EMBED=quant_embed).eval()
        train_gpt.write_artifact(tmp_path / f"{quant_embed}.skc", train_gpt.compress_payload(train_gpt.serialize_model(models[quant_embed])))
    script = WARM_UP_SCRIPT + RELOAD_SCRIPT.format(repo=str(REPO), directory=str(tmp_path), names=list(models),
                                                   batch=str(tmp_path / "batch.pt"), result=str(tmp_path / "out.pt"))
    subprocess.run([sys.executable, "-c", script], check=True)
    reloaded = torch.load(tmp_path / "out.pt")
    for quant_embed, model in models.items():
        nll, codes = reloaded[quant_embed]
        with torch.no_grad():
            assert torch.equal(nll, model.token_nll(*batch)), quant_embed
        for name, module in model.named_modules():
            if isinstance(module, train_gpt.TernaryLinear):
                assert codes[name] == module.quantize()[0].tolist(), (quant_embed, name)


@pytest.mark.parametrize("damage", ["truncate", "codec", "flip", "empty"])
def test_corrupt_artifact_gives_a_clear_error(tmp_path, damage):
    """Truncated, unknown-codec, bit-flipped or empty artifacts raise ConfigError naming the file."""
    blob = bytearray(train_gpt.compress_payload(train_gpt.serialize_model(tiny_model())))
    blob = {"truncate": blob[: len(blob) // 2], "codec": b"\x07" + blob[1:], "empty": b"",
            "flip": blob[:100] + bytes([blob[100] ^ 0xFF]) + blob[101:]}[damage]
    path = tmp_path / "bad.skc"
    path.write_bytes(bytes(blob))
    with pytest.raises(train_gpt.ConfigError) as error:
        train_gpt.load_model_from_artifact(path, "cpu")
    assert str(path) in str(error.value)


def test_artifact_of_another_config_is_refused(tmp_path):
    """An artifact whose tensor table does not match its config is refused with a clear message."""
    model = tiny_model()
    payload = train_gpt.serialize_model(model)
    header_len = int.from_bytes(payload[5:9], "little")
    header = json.loads(payload[9:9 + header_len])
    header["config"]["num_layers"] = 5
    new_header = json.dumps(header, sort_keys=True).encode()
    payload = payload[:5] + len(new_header).to_bytes(4, "little") + new_header + payload[9 + header_len:]
    path = tmp_path / "other.skc"
    train_gpt.write_artifact(path, train_gpt.compress_payload(payload))
    with pytest.raises(train_gpt.ConfigError, match="lacks tensors"):
        train_gpt.load_model_from_artifact(path, "cpu")


def test_export_report_accounts_for_every_payload_byte():
    """The per-class byte report sums to the payload minus the header."""
    model = tiny_model()
    payload = train_gpt.serialize_model(model)
    header_len = int.from_bytes(payload[5:9], "little")
    assert sum(train_gpt.export_report(model).values()) == len(payload) - 9 - header_len


def test_artifact_over_the_budget_never_gets_the_final_name(tmp_path):
    """export_artifact refuses an artifact that does not fit with the code bytes: the run stops with the limit in
    the message, and the file is kept only as final_model.skc.over_budget."""
    lines, path = [], tmp_path / "big" / "final_model.skc"
    with pytest.raises(train_gpt.ConfigError, match="16,000,000-byte limit") as error:
        train_gpt.export_artifact(_trained_tiny_model(), {}, path, train_gpt.Dist(), lines.append, code_bytes=train_gpt.BUDGET_BYTES - 1000)
    assert not path.exists()
    assert (tmp_path / "big" / "final_model.skc.over_budget").is_file() and "over_budget" in str(error.value)
    blob = train_gpt.export_artifact(_trained_tiny_model(), {"temperature": 1.25}, path, train_gpt.Dist(), lines.append, code_bytes=1000)
    assert path.read_bytes() == blob
    assert train_gpt.model_from_artifact(blob, path, "cpu")[1] == {"temperature": 1.25}  # the meta travels in the artifact
