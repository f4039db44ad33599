"""LoRA adapters on disk in PEFT's format (docs/formats.md section 5): a directory holding
adapter_config.json and adapter_model.safetensors (metadata {"format": "pt"}) with keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`.

Only JSON and safetensors are ever read (no pickle). Each file is written to a temporary name in the same
directory, flushed to disk and renamed over the target (os.replace is atomic), so a crash leaves either the old
file or the new one, never a torn one. The config is serialized before anything is written and written last, so
a directory with a new config always has the new weights next to it, and a config that cannot be written changes
nothing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .lora import LoRALinear, check_lora_args
from .surgery import _check_root, _check_wrappable, _linear_layers, _lora_layers, _name_matches, _set_submodule

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# PEFT also saves the base weight of an adapted embedding-like layer (lm_head: its save_embedding_layers="auto").
_BASE_SUFFIX = ".base_layer.weight"

# PEFT LoraConfig fields that switch on features this implementation does not have, with the value that means
# "off". An adapter that sets any of them otherwise is refused rather than silently loaded wrong.
PLAIN_INITS = ("gaussian", "eva", "orthogonal")  # PEFT's init_lora_weights strings that keep the base as it is
_UNSUPPORTED = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "modules_to_save": None,
    "layer_replication": None,
    "lora_bias": False,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "use_bdlora": False,
}
_WRITTEN_OFF = ("bias", "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern")
# fan_in_fan_out is not among them: it only says that a base layer stores its weight (in, out) (GPT-2's Conv1D), and
# lora_A / lora_B have the same shapes and meaning either way (PEFT sets the flag to match each layer it wraps).


def _is_off(value, off) -> bool:
    """A string switch must equal its "off" value; others are off when falsy (PEFT writes null, [], {} or false)."""
    return value == off if isinstance(off, str) else not value


# -- writing ---------------------------------------------------------------------------------------------------
def _uniform(layers: dict[str, LoRALinear], attr: str):
    values = {getattr(m, attr) for m in layers.values()}
    if len(values) != 1:
        examples = {getattr(m, attr): name for name, m in layers.items()}
        raise ValueError(
            f"the LoRA layers differ in {attr} ({examples}); PEFT expresses that with rank_pattern/alpha_pattern, "
            "which save_adapter does not write"
        )
    return values.pop()


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT's target_modules for exactly these layers: their short names when those select exactly these layers
    of the model (the usual case), else an anchored regex of the full names.

    PEFT matches the names against every module of the base model and refuses to adapt one that is not a layer it
    knows (a GELU named "1" in an nn.Sequential), so every module counts here, bar the insides of the LoRA wrappers
    (the base model has none)."""
    short = sorted({name.rpartition(".")[2] for name in names})
    inside = tuple(name + "." for name in names)
    modules = {name for name, _ in model.named_modules() if name and not name.startswith(inside)}
    if {m for m in modules if any(_name_matches(m, s) for s in short)} == set(names):
        return short
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def save_adapter(
    model: nn.Module,
    directory,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the LoRA weights of `model` (float32, on the CPU) and a PEFT adapter_config.json into `directory`.

    task_type defaults to "CAUSAL_LM" for *ForCausalLM and *LMHeadModel (GPT-2) models (what PeftModel.from_pretrained
    keys on), else none;
    base_model_name_or_path (a str or path) defaults to model.config.name_or_path when the model has one.
    weights: the LoRA tensors by parameter name ("<layer>.lora_A.weight", as model.named_parameters() has them)
    when the model's own are not whole, e.g. gathered from the shards of a distributed run.
    """
    _check_root(model)
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"task_type must be a str or None, got {task_type!r}")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save (add_lora first)")
    r, alpha, use_rslora = _uniform(layers, "r"), _uniform(layers, "alpha"), _uniform(layers, "use_rslora")
    dropout, init = _uniform(layers, "dropout"), _uniform(layers, "init")
    if task_type is None and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        task_type = "CAUSAL_LM"
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str, a path or None, got {base_model_name_or_path!r}")

    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            value = getattr(layer, part).weight if weights is None else weights[key]
            tensors[KEY_PREFIX + key] = value.detach().float().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": _target_modules(model, list(layers)),
        "init_lora_weights": True if init == "kaiming" else "gaussian",
        "inference_mode": True,
        # The common feature switches, written "off" explicitly (PEFT's own defaults) for readers that expect them.
        **{key: _UNSUPPORTED[key] for key in _WRITTEN_OFF}, "fan_in_fan_out": False,
    }
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"  # before any write: a failure here changes nothing

    from nf4lora.models.output_dir import write_file_atomic, write_text_atomic  # models imports lora lazily, too

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_file_atomic(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(directory / CONFIG_NAME, text)
    return directory


# -- reading ---------------------------------------------------------------------------------------------------
def read_adapter_config(directory) -> dict:
    """adapter_config.json of `directory`, validated: a LoRA adapter using only features implemented here."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key, off in _UNSUPPORTED.items():
        value = config.get(key, off)
        if not _is_off(value, off):
            raise ValueError(f"{path}: {key} = {value!r} is not supported (only {off!r}); this adapter cannot be loaded")
    # Only these PEFT initializations leave the base weights as they are and the forward plain ("orthogonal" starts
    # with B @ A = 0, "eva" sets A from data). The others (pissa, pissa_niter_*, olora, corda, loftq, lora_ga) subtract
    # the initial adapter from the base, or requantize it, when the adapter is created: such an adapter is right
    # only on that modified base, which it does not carry; "mica" is a variant with a forward of its own.
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in PLAIN_INITS):
        raise ValueError(
            f"{path}: init_lora_weights = {init!r} is not supported (only true, false or one of {PLAIN_INITS}): that "
            "initialization changed the base weights (or the forward), which the adapter does not carry; save it "
            "from PEFT with path_initial_model_for_weight_conversion to get a plain LoRA adapter"
        )
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{path} lacks {key!r}")
    try:
        check_lora_args(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), config.get("use_rslora", False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (only safetensors adapters are read, never pickles)")
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _group_by_module(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": tensor, "B": tensor[, "base": tensor]}} from PEFT keys ("base": PEFT's copy of the
    adapted layer's own weight); raises on any other key."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(KEY_PREFIX) and key.endswith(_BASE_SUFFIX):
            modules.setdefault(key[len(KEY_PREFIX) : -len(_BASE_SUFFIX)], {})["base"] = value
            continue
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if not key.startswith(KEY_PREFIX) or suffix is None:
            raise ValueError(
                f"{path}: unexpected key {key!r}; expected '{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'"
            )
        modules.setdefault(key[len(KEY_PREFIX) : -len(suffix)], {})[suffix[6]] = value
    for name, pair in modules.items():
        missing = [f"{KEY_PREFIX}{name}.lora_{part}.weight" for part in ("A", "B") if part not in pair]
        if missing:
            raise ValueError(f"{path}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    if not modules:
        raise ValueError(f"{path} holds no LoRA tensors")
    return modules


def _check_base_copy(layer: nn.Module, saved: torch.Tensor, where: str) -> None:
    """PEFT's copy of an adapted layer's own weight is accepted when it is the model's weight (then it carries
    nothing new). One that differs (another base, a resized vocabulary) would have to replace the model's, which
    loading an adapter does not do: refused."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    weight = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or weight is None or weight.dtype == torch.uint8:
        raise ValueError(f"{where}: the adapter carries a copy of this layer's weight, which can only be checked "
                         "against a 16-bit layer; load the adapter onto the model with that layer unquantized")  # fmt: skip
    differs = saved.shape != weight.shape
    if not differs and not weight.is_meta:  # a skeleton on the meta device (check_adapter) has only shapes
        differs = not torch.equal(saved.to(weight.device, weight.dtype), weight.detach())
    if differs:
        raise ValueError(f"{where}: the adapter carries its own copy of this layer's weight (PEFT's "
                         "save_embedding_layers) and it differs from the model's: it was saved from another base "
                         "or with a resized vocabulary; load it onto that base")  # fmt: skip


def load_adapter(model: nn.Module, directory) -> list[str]:
    """Load a PEFT LoRA adapter into `model` (in place) and return the names of the adapted layers.

    Layers without LoRA are wrapped with the adapter's r / lora_alpha / lora_dropout / use_rslora; layers that
    already have LoRA (from add_lora) must match its rank, and then the set of adapted layers must be exactly the
    adapter's. Everything is validated before the model is touched. Afterwards only LoRA weights require grad.
    """
    config, modules, existing, linears = _checked(model, directory)
    r, alpha = config["r"], config["lora_alpha"]
    dropout, use_rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
    model.requires_grad_(False)
    for name, pair in modules.items():
        layer = existing.get(name)
        if layer is None:
            # The wrapper takes the mode of the layer it replaces, as in add_lora: loading an adapter into a model
            # in eval mode must not switch its dropout on.
            layer = LoRALinear(linears[name], r, alpha, dropout, use_rslora).train(linears[name].training)
            _set_submodule(model, name, layer)
        with torch.no_grad():
            layer.lora_A.weight.copy_(pair["A"])
            layer.lora_B.weight.copy_(pair["B"])
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return list(modules)


def check_adapter(model: nn.Module, directory) -> None:
    """Every check load_adapter makes, without changing `model`. On a skeleton of the model (built on the meta
    device: no memory, no loading) this refuses an adapter of another model before the real one is loaded."""
    _checked(model, directory)


def _checked(model: nn.Module, directory):
    """(adapter config, {module: tensors} in model order, existing LoRA layers, Linear layers), all validated."""
    _check_root(model)
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    modules = _group_by_module(_read_tensors(weights_path), weights_path)
    r, alpha, use_rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    existing, linears = _lora_layers(model), _linear_layers(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    modules = dict(sorted(modules.items(), key=lambda item: order.get(item[0], len(order))))  # model order
    if existing and set(existing) != set(modules):
        raise ValueError(
            f"model already has LoRA layers, and they differ from the adapter's: only in the model "
            f"{sorted(set(existing) - set(modules))[:3]}, only in the adapter {sorted(set(modules) - set(existing))[:3]}"
        )
    for name, pair in modules.items():
        layer = existing.get(name) or linears.get(name)
        if layer is None:
            raise ValueError(
                f"{weights_path}: {KEY_PREFIX}{name}.lora_A.weight names no Linear layer of the model "
                f"(e.g. {next(iter(linears), 'none')!r})"
            )
        if isinstance(layer, LoRALinear):
            if layer.merged:
                raise ValueError(f"LoRA layer {name} is merged; unmerge it before loading an adapter into it")
            if (layer.r, layer.alpha, layer.use_rslora) != (r, alpha, use_rslora):
                raise ValueError(
                    f"LoRA layer {name} has r={layer.r}, alpha={layer.alpha}, use_rslora={layer.use_rslora} but the "
                    f"adapter has r={r}, lora_alpha={alpha}, use_rslora={use_rslora}: its weights do not fit the layer "
                    "or its outputs would differ from the adapter's"
                )
        expected = {"A": (r, layer.in_features), "B": (layer.out_features, r)}
        for part, shape in expected.items():
            if tuple(pair[part].shape) != shape:
                raise ValueError(
                    f"{weights_path}: {KEY_PREFIX}{name}.lora_{part}.weight has shape {tuple(pair[part].shape)}, "
                    f"but layer {name} ({layer.out_features}x{layer.in_features}) with r={r} needs {shape}"
                )
            if not pair[part].is_floating_point():
                raise ValueError(f"{weights_path}: {KEY_PREFIX}{name}.lora_{part}.weight is {pair[part].dtype}, not a float")
        if "base" in pair:
            _check_base_copy(layer, pair["base"], f"{weights_path}: {KEY_PREFIX}{name}{_BASE_SUFFIX}")
    _check_wrappable(model, modules, str(weights_path))
    return config, modules, existing, linears
