"""Train a Video-LLaMA stage: `python train.py --config configs/train_vl_stage1.yaml [--set key=value ...]`.

The same command as `vllama-jax train` (`vllama_jax.cli.train`; `--help` lists every option).
"""

import sys

from vllama_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
