"""The reward-model core that the service and the trainer share, importing neither.

- ``model_dir``: a reward-model directory's ``reward_model.json`` spec, tokenizer and base model.
- ``formatting``: (prompt messages, response) -> model input; the one prompt parser and renderer.
- ``loading``: the HF model a directory describes (overlays, LoRA, value heads).
- ``forward``: ``reward_forward``, padding and batch planning.
- ``bert``: a BERT block run apart from the model's forward (first rows only, lower blocks alone).
- ``backends``: padded token arrays in, one reward per row out (torch, ONNX Runtime).
- ``store``: the comparison store (SQLite/PostgreSQL) and its migrations.

Modules import torch, transformers and SQLAlchemy lazily or only where they need them, so
importing one module does not pull in the others' dependencies.
"""
