"""`python -m nf4lora ...` is the `nf4lora` command; it is also how torchrun starts one per process:

    torchrun --nproc_per_node=2 -m nf4lora finetune --parallel fsdp ...
"""

import sys

from nf4lora.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
