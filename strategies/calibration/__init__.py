"""SeerAttention gate calibration on the served model (self-distillation, base model frozen): ``train`` (the
trainer, the recall report and the offline calibration text), ``config`` (its options) and ``cli`` (the
``attnserve calibrate-seer | seer-report | calibration-text`` commands). Imports nothing heavy itself."""
