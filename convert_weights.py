#!/usr/bin/env python
"""Convert the released Video-LLaMA PyTorch files into one vllama-jax model directory, and back.

    python convert_weights.py RELEASE_FOLDER --out models/video-llama-2-7b
    python convert_weights.py --eva-vit eva_vit_g.pth --blip2 blip2_pretrained_flant5xxl.pth \\
        --imagebind imagebind_huge.pth --llama llama-2-7b-chat-hf --vl-ckpt VL_LLaMA_2_7B_Finetuned.pth \\
        --al-ckpt AL_LLaMA_2_7B_Finetuned.pth --out models/video-llama-2-7b
    python convert_weights.py export --model models/my-finetune --out my_finetune.pth

The same commands as `vllama-jax convert` / `vllama-jax export` (`vllama_jax.cli.convert`; `--help` lists every
option).
"""

import sys

from vllama_jax.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] == ["export"] else ["convert", *args]))
