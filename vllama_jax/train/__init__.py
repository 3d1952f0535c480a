"""Training: `python train.py --config configs/train_*.yaml` (see `loop`).

config.py     TrainConfig (the four upstream stages as YAML), validation, `--set` overrides
optimizer.py  trainable/frozen split by freeze flags, AdamW with upstream's decay groups, linear_warmup_cosine_lr
step.py       the pure jitted train step (token-weighted gradient accumulation, dropout keys from the step)
data.py       grain pipeline from the config, synthetic captions, per-process rows -> global arrays
checkpoint.py Orbax checkpoints of the trained groups, optimizer state and data iterator
metrics.py    TensorBoard + CSV + console, FLOPs from XLA cost analysis (MFU)
loop.py       Trainer (set-up, resume, run, dry run) and the command line
"""
