"""Model surgery for ``reward train-rm``: which weights a train mode trains, and the module DDP wraps.

* ``full``: every weight.
* ``top``: the top N transformer blocks (:func:`find_blocks`), the modules after them (BERT's
  pooler, decoders' final norm: :func:`post_block_module_names`) and the reward head
  (:func:`head_module_names`); saved as a partial state dict over ``base_model``.
* ``lora``: a PEFT LoRA adapter (:func:`wrap_lora`), the head (+ pooler) trained fully via
  ``modules_to_save``.

:func:`make_reward_module` is the ``nn.Module`` whose forward is
:func:`reward_core.forward.reward_forward`, so DDP sees (and syncs) the real forward.
torch and peft are imported inside the functions: importing this module stays light.
"""

from __future__ import annotations

from typing import Any, Iterable

from .reward_config import RewardTrainingConfig, TrainingConfigError

# Modules after the last transformer block that belong with the head in `top` mode.
POST_BLOCK_MODULES = ("pooler", "norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def find_blocks(model: Any) -> tuple[str, Any]:
    """(name, ModuleList) of the transformer blocks: the ModuleList with num_hidden_layers entries."""
    import torch.nn as nn

    config = model.config
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise TrainingConfigError(f"cannot find the {n} transformer blocks of {type(model).__name__} for top mode")
    return min(found, key=lambda item: len(item[0]))


def head_module_names(model: Any) -> list[str]:
    """Top-level modules outside the backbone that hold weights: the reward head (classifier/score)."""
    prefix = model.base_model_prefix
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def post_block_module_names(model: Any) -> list[str]:
    """Backbone modules after the last block (BERT's pooler, decoders' final norm), full names."""
    prefix = model.base_model_prefix
    backbone = getattr(model, prefix, None)
    if backbone is None:
        return []
    return [f"{prefix}.{n}" for n, m in backbone.named_children() if n in POST_BLOCK_MODULES and any(True for _ in m.parameters())]


def top_mode_modules(model: Any, top_layers: int) -> list[str]:
    """Names of the modules ``top`` mode trains (and saves): top blocks, post-block modules, head."""
    blocks_name, blocks = find_blocks(model)
    if top_layers > len(blocks):
        raise TrainingConfigError(f"top_layers={top_layers} but the model has {len(blocks)} blocks")
    top = [f"{blocks_name}.{i}" for i in range(len(blocks) - top_layers, len(blocks))]
    return top + post_block_module_names(model) + head_module_names(model)


def under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether the parameter / module ``name`` is one of ``prefixes`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def apply_train_mode(model: Any, config: RewardTrainingConfig, architecture: str, base_ref: str):
    """Mark the weights ``config.train_mode`` trains. Returns (model, peft_model, saved_prefixes):
    the HF model (LoRA layers injected in place), the PEFT wrapper in lora mode (else None), and
    in top mode the module names whose weights are saved (else None)."""
    if config.train_mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None, None
    if config.train_mode == "top":
        prefixes = top_mode_modules(model, config.top_layers)
        for name, p in model.named_parameters():
            p.requires_grad_(under(name, prefixes))
        return model, None, prefixes
    peft_model = wrap_lora(model, config, architecture, base_ref)
    return peft_model.get_base_model(), peft_model, None


def wrap_lora(model: Any, config: RewardTrainingConfig, architecture: str, base_ref: str):
    """The PEFT model of ``model`` with LoRA adapters; the head (and an encoder's pooler) are
    trained fully (``modules_to_save``) and get no adapter."""
    import torch.nn as nn
    from peft import LoraConfig, TaskType, get_peft_model

    heads = head_module_names(model)
    post = post_block_module_names(model) if architecture == "encoder" else []
    modules_to_save = heads + [n.split(".")[-1] for n in post]
    exclude = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (under(name, post) or under(name, heads))
    ]
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or None, modules_to_save=modules_to_save,
        exclude_modules=exclude or None,
    )
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:
        raise TrainingConfigError(f"cannot set up LoRA on {type(model).__name__}: {exc}") from exc
    peft_model.peft_config["default"].base_model_name_or_path = base_ref
    return peft_model


def make_reward_module(model: Any, architecture: str, cache: Any = None):
    """An nn.Module whose forward is reward_core.forward.reward_heads (every head, and what a gate
    reads), so DDP sees the real forward. With a :class:`trainer.frozen_cache.FrozenPrefixCache`
    the frozen lower blocks' output comes from the cache and only the trained blocks run."""
    import torch
    import torch.nn as nn

    from reward_core.forward import reward_heads

    class RewardModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, chunks, order):
            # One DDP forward over several length-sorted chunks: each chunk is padded only to its
            # own longest row, and the outputs come back in the batch's original row order.
            # Returns (heads [rows, H], prompt features [rows, hidden] or None).
            parts = [cache.heads(architecture, *chunk) if cache is not None else reward_heads(self.model, architecture, *chunk)
                     for chunk in chunks]
            heads = torch.cat([h for h, _ in parts])[order]
            if parts[0][1] is None:
                return heads, None
            return heads, torch.cat([f for _, f in parts])[order]

    return RewardModule()


def set_objective_heads(model: Any, n_objectives: int) -> None:
    """Give the model one fresh head output per objective (the classifier's last linear layer,
    initialised as HF initialises heads)."""
    import torch.nn as nn

    names = head_module_names(model)
    owner, attr, linear = None, None, None
    for name in names:
        module = getattr(model, name)
        if isinstance(module, nn.Linear):
            owner, attr, linear = model, name, module
        else:  # e.g. RoBERTa's classifier: dense -> out_proj
            for child_name, child in module.named_children():
                if isinstance(child, nn.Linear) and child.out_features == model.config.num_labels:
                    owner, attr, linear = module, child_name, child
    if linear is None:
        raise TrainingConfigError(f"cannot find the reward head of {type(model).__name__} to give it one output per objective")
    new = nn.Linear(linear.in_features, n_objectives, bias=linear.bias is not None).to(linear.weight.dtype)
    std = getattr(model.config, "initializer_range", 0.02)
    nn.init.normal_(new.weight, std=std)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    setattr(owner, attr, new)
    model.config.num_labels = n_objectives
