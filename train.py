"""Train a Video-LLaMA stage: `python train.py --config configs/train_vl_stage1.yaml [--set key=value ...]`.

Thin entry point; everything lives in `vllama_jax.train.loop` (see `--help`). `--fake-devices N` must take effect
before jax starts, so it is applied here, before anything imports jax.
"""

import os
import sys


def _fake_devices_from_argv(argv: list[str]) -> None:
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--fake-devices=") else (
            argv[i + 1] if a == "--fake-devices" and i + 1 < len(argv) else None)
        if value is not None and value.isdigit() and int(value) > 0:
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f]
            os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={value}"])
            os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _fake_devices_from_argv(sys.argv[1:])
    from vllama_jax.train.loop import main

    sys.exit(main(sys.argv[1:]))
