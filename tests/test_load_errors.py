"""Bad checkpoints fail with errors that name the file and the key (issue 5, acceptance item 8)."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model_helpers import hf_model, tiny_config

from nf4lora.models import load_model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    hf = hf_model(tiny_config())
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="40KB")
    return root


@pytest.fixture
def single(source, tmp_path):
    return shutil.copytree(source / "single", tmp_path / "m")


@pytest.fixture
def sharded(source, tmp_path):
    return shutil.copytree(source / "sharded", tmp_path / "m")


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite(file, edit):
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_missing_config(single):
    os.remove(single / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(str(single / "config.json"))):
        load_model(single)


def test_config_not_json(single):
    (single / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(single)


def test_missing_weights(single):
    os.remove(single / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_model(single)


def test_pickled_weights_are_refused(single):
    os.replace(single / "model.safetensors", single / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*only safetensors"):
        load_model(single)


def test_unsupported_architecture(single):
    _edit_config(single, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt_neox' is not supported"):
        load_model(single)


def test_unsupported_rope_type(single):
    _edit_config(single, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"config\.json: RoPE type 'yarn' is not supported"):
        load_model(single)


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=re.escape(shard.name) + r": tensor '.+' lies past the end of the file"):
        load_model(sharded)


def test_corrupt_header(single):
    file = single / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"\xff" * 12
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors: corrupt safetensors header"):
        load_model(single)


def test_garbage_file(single):
    (single / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors file"):
        load_model(single)


def test_missing_tensor(single):
    _rewrite(single / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \(112, 64\)\)"):
        load_model(single, quantize="nf4")


def test_misshaped_tensor(single):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)

    _rewrite(single / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                                         r"\(64, 64\), but config.json implies \(32, 64\)"):  # fmt: skip
        load_model(single, quantize=None)


def test_unexpected_tensor(single):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)

    _rewrite(single / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_norm.weight' \(in model.safetensors\)"):
        load_model(single)


@pytest.mark.parametrize("key", ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"])
def test_integer_parameter_is_refused_not_cast(single, key):
    def edit(t):
        t[key] = t[key].to(torch.int8)

    _rewrite(single / "model.safetensors", edit)
    for quantize in ("nf4", None):
        with pytest.raises(TypeError, match=re.escape(f"{key!r} is stored as torch.int8; a parameter must be a float")):
            load_model(single, quantize=quantize)


def test_index_names_a_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=re.escape(f"shard {shard.name!r}")):
        load_model(sharded)


def test_index_lists_a_key_its_shard_lacks(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(f"tensor {key!r} is listed in shard {shards[1]!r}")):
        load_model(sharded)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"quantize": "int8"}, ValueError, "quantize must be one of .* got 'int8'"),
        ({"blocksize": 100}, ValueError, "blocksize must be one of .* got 100"),
        ({"compute_dtype": torch.int8}, TypeError, "compute_dtype must be 'auto' or one of .* got torch.int8"),
        ({"double_quant": "yes"}, TypeError, "double_quant must be a bool"),
    ],
)
def test_bad_arguments(single, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_model(single, **kwargs)


def test_unsupported_quantization_config(single):
    _edit_config(single, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match=r"config\.json: quantization_config 'gptq'"):
        load_model(single)
