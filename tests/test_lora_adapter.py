"""save_adapter / load_adapter: the files (format, metadata, atomic writes) and every adapter we refuse."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nf4lora.lora import LoRALinear, add_lora, load_adapter, save_adapter
from nf4lora.lora import adapter as adapter_module


class Net(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _trained(seed=0, r=4, width=32):
    torch.manual_seed(seed)
    net = Net(width)
    add_lora(net, r=r, alpha=8, target_modules=["up", "down"])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
    return net


def _saved(tmp_path, **kwargs):
    path = tmp_path / "adapter"
    save_adapter(_trained(**kwargs), path)
    return path


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_files_follow_peft_format_and_round_trip(tmp_path):
    net = _trained()
    save_adapter(net, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == [f"base_model.model.{m}.lora_{ab}.weight" for m in ("down", "up") for ab in "AB"]
        assert f.get_tensor("base_model.model.up.lora_A.weight").dtype == torch.float32
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down", "up"] and config["bias"] == "none" and config["use_dora"] is False

    torch.manual_seed(0)
    fresh = Net()
    x = torch.randn(3, 32)
    assert load_adapter(fresh, tmp_path / "a") == ["up", "down"]
    assert torch.equal(fresh(x), net(x))


def test_partial_targets_are_written_as_an_exact_regex(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(Net(), Net())
    add_lora(net, r=2, alpha=2, target_modules=["0.up"])
    save_adapter(net, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == r"^(?:0\.up)$"


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(adapter_module, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(_trained(seed=5), path)
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before  # old files, no temp files


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(use_dora=True), "use_dora = True is not supported"),
        (dict(rank_pattern={"up": 8}), "rank_pattern = .* is not supported"),
        (dict(alpha_pattern={"up": 16}), "alpha_pattern = .* is not supported"),
        (dict(bias="lora_only"), "bias = 'lora_only' is not supported"),
        (dict(bias="all"), "bias = 'all' is not supported"),
        (dict(modules_to_save=["head"]), "modules_to_save = .* is not supported"),
        (dict(peft_type="IA3"), "peft_type must be 'LORA'"),
        (dict(r=0), "r must be a positive int, got 0"),
        (dict(lora_alpha=-1), "alpha must be a positive finite number, got -1"),
        (dict(lora_dropout=1.5), r"dropout must be a number in \[0, 1\)"),
        # Initializations that changed the base weights (see test_peft_interop for PEFT's own adapters).
        *[
            (dict(init_lora_weights=i), rf"init_lora_weights = '{i}' is not supported \(only true, false or one of")
            for i in ("pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "mica")
        ],
    ],
)
def test_unsupported_or_invalid_configs_are_refused(tmp_path, changes, match):
    path = _saved(tmp_path)
    _edit_config(path, **changes)
    torch.manual_seed(0)
    net = Net()
    with pytest.raises(ValueError, match=match):
        load_adapter(net, path)
    assert not any(isinstance(m, LoRALinear) for m in net.modules())  # refused before touching the model


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_plain_inits_load(tmp_path, init):
    path = _saved(tmp_path)
    _edit_config(path, init_lora_weights=init)
    torch.manual_seed(0)
    assert load_adapter(Net(), path) == ["up", "down"]


def test_config_is_serialized_before_anything_is_written(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}

    def unserializable(*args, **kwargs):
        raise TypeError("cannot serialize")

    with monkeypatch.context() as m:  # a config that fails to serialize leaves the old files, weights included
        m.setattr(json, "dumps", unserializable)
        with pytest.raises(TypeError, match="cannot serialize"):
            save_adapter(_trained(seed=5), path)
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before
    with pytest.raises(TypeError, match=r"base_model_name_or_path must be a str, a path or None, got <object"):
        save_adapter(_trained(seed=5), path, base_model_name_or_path=object())
    with pytest.raises(TypeError, match="task_type must be a str or None, got 3"):
        save_adapter(_trained(seed=5), path, task_type=3)
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before  # old files, no temp files
    save_adapter(_trained(seed=5), path, base_model_name_or_path=Path("models") / "llama")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.join("models", "llama")


@pytest.mark.parametrize("training", [True, False])
def test_load_keeps_the_model_mode(tmp_path, training):
    """An adapter loaded into a model in eval mode must not switch its dropout on (and in train mode it is on)."""
    path = _saved(tmp_path)
    _edit_config(path, lora_dropout=0.5)
    torch.manual_seed(0)
    net = Net().train(training)
    load_adapter(net, path)
    assert all(m.training == training for m in net.modules())
    x = torch.randn(8, 32)
    assert torch.equal(net(x), net(x)) != training  # eval: deterministic; train: dropout draws differ


def test_shape_mismatch_names_the_key(tmp_path):
    path = _saved(tmp_path, width=16)
    with pytest.raises(ValueError, match=r"base_model\.model\.up\.lora_A\.weight has shape \(4, 16\).* needs \(4, 32\)"):
        load_adapter(Net(32), path)
    path_r = _saved(tmp_path / "r8", r=8)
    _edit_config(path_r, r=4)  # the config and the tensors disagree on the rank
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \(8, 32\)"):
        load_adapter(Net(), path_r)


def test_bad_tensor_files_are_refused(tmp_path):
    path = _saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)

    def rewrite(tensors):
        save_file(tensors, weights, metadata={"format": "pt"})

    rewrite({k.replace(".up.", ".side."): v for k, v in tensors.items()})
    with pytest.raises(ValueError, match=r"base_model\.model\.side\.lora_A\.weight names no Linear layer"):
        load_adapter(Net(), path)
    rewrite({k: v for k, v in tensors.items() if k != "base_model.model.up.lora_B.weight"})
    with pytest.raises(ValueError, match=r"base_model\.model\.up\.lora_B\.weight is missing"):
        load_adapter(Net(), path)
    rewrite(tensors | {"base_model.model.up.lora_magnitude_vector": torch.ones(64)})
    with pytest.raises(ValueError, match="unexpected key 'base_model.model.up.lora_magnitude_vector'"):
        load_adapter(Net(), path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(Net(), path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        load_adapter(Net(), tmp_path / "nowhere")


def test_loading_into_existing_lora_layers_checks_them(tmp_path):
    path = _saved(tmp_path)
    torch.manual_seed(0)
    other = Net()
    add_lora(other, r=4, alpha=8, target_modules=["up"])
    with pytest.raises(ValueError, match=r"only in the adapter \['down'\]"):
        load_adapter(other, path)
    torch.manual_seed(0)
    other = Net()
    add_lora(other, r=4, alpha=4, target_modules=["up", "down"])
    with pytest.raises(ValueError, match="alpha=4.*lora_alpha=8"):
        load_adapter(other, path)
    for layer_r, adapter_r in ((4, 1), (2, 4)):  # r=1 tensors would broadcast into r=4 layers
        torch.manual_seed(0)
        other = Net()
        add_lora(other, r=layer_r, alpha=8, target_modules=["up", "down"])
        other.up.base_layer.requires_grad_(True)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        trainable = {n for n, p in other.named_parameters() if p.requires_grad}
        with pytest.raises(ValueError, match=rf"LoRA layer up has r={layer_r}, .* the adapter has r={adapter_r},"):
            load_adapter(other, _saved(tmp_path / f"r{adapter_r}", r=adapter_r))
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # refused before touching it
        assert {n for n, p in other.named_parameters() if p.requires_grad} == trainable
    torch.manual_seed(0)
    same = Net()
    add_lora(same, r=4, alpha=8, target_modules=["up", "down"])
    load_adapter(same, path)
    x = torch.randn(2, 32)
    assert torch.equal(same(x), _trained()(x))


def test_adapter_for_multihead_attentions_out_proj_is_refused(tmp_path):
    """nn.MultiheadAttention reads out_proj.weight without calling out_proj: a LoRA wrapper there would break it."""
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True))
    path = _saved(tmp_path)
    key = "base_model.model.0.self_attn.out_proj"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 16), f"{key}.lora_B.weight": torch.zeros(16, 4)},
              path / "adapter_model.safetensors", metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(ValueError, match=r"selects \['0\.self_attn\.out_proj'\]: the out_proj of an nn\.Multihead"):
        load_adapter(model, path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_save_refuses_models_it_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        save_adapter(Net(), tmp_path / "a")
    net = Net()
    net.up = LoRALinear(net.up, r=2, alpha=4)
    net.down = LoRALinear(net.down, r=4, alpha=4)
    with pytest.raises(ValueError, match="differ in r .*rank_pattern"):
        save_adapter(net, tmp_path / "a")
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")
