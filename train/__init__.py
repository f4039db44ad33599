"""Training: JSONL data with prompt masking and packing, CPU-paged AdamW, the resumable loop, the `nf4lora` CLI."""

from .config import TrainConfig
from .loop import TrainResult, train
from .optim import PagedAdamW

__all__ = ["PagedAdamW", "TrainConfig", "TrainResult", "train"]
