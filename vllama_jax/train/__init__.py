"""Training: `python train.py --config configs/train_*.yaml` (see `loop`).

config.py       TrainConfig (the four upstream stages as YAML), validation, `--set` overrides
optimizer.py    trainable/frozen split by freeze flags, AdamW with upstream's decay groups, linear_warmup_cosine_lr
step.py         the pure jitted train step (token-weighted gradient accumulation, dropout keys from the step)
data.py         grain pipeline from the config, synthetic captions, per-process rows -> global arrays
distributed.py  multi-host initialisation and the device mesh
checkpoint.py   Orbax checkpoints of the trained groups, optimizer state and data iterator
metrics.py      TensorBoard + CSV + console, FLOPs from XLA cost analysis (MFU)
loop.py         Trainer: set-up, parameters, resume, run (its command line: `vllama_jax.cli.train`)
dry_run.py      the step compiled from shapes only for a mesh (or a TPU slice that is not there): bytes per device

The batch layouts (caption, instruction) are defined once in `vllama_jax.data.batch`.
"""
