"""Training pretrained encoders on one GPU: LoRA adapters (peft), gradient checkpointing, and merging adapters into
plain weights when a checkpoint is saved.

LoRA adapters are injected into the encoder's own model in place (`peft.inject_adapter_in_model`): the model keeps
its class and forward, its weights stop training and only the adapters do. A parameter `x.q_proj.weight` then
lives at `x.q_proj.base_layer.weight`, beside `x.q_proj.lora_A.default.weight` and `lora_B`.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv")


def lora_targets(model: nn.Module) -> list[str]:
    """Default LoRA targets of a model: its attention projections (transformers' q_proj/k_proj/v_proj or
    query/key/value, timm's qkv); a CNN has none, so there every convolution (depthwise ones excepted) and linear
    layer."""
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
    }
    if found:
        return sorted(found)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or isinstance(module, nn.Conv2d) and module.groups == 1
    ]


def add_lora(model: nn.Module, rank: int, targets: list[str] | None = None) -> None:
    """Inject LoRA adapters of `rank` (alpha = 2 * rank) into `model`; only they remain trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = targets or lora_targets(model)
    if not targets:
        raise ValueError(f"{type(model).__name__}: no layers to put LoRA adapters on; name them with *_lora_targets")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0), model)


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in model.modules())


@torch.no_grad()
def merged_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (model's state dict) with every LoRA adapter folded into its base layer's weight and the adapter
    tensors dropped: the state dict of the same model without adapters. The model itself is left unchanged."""
    from peft.tuners.lora import LoraLayer

    merged = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = f"{name}.base_layer."
        for key in [k for k in merged if k.startswith(base)]:
            merged[f"{name}.{key[len(base) :]}"] = merged.pop(key)
        weight = merged[f"{name}.weight"]
        merged[f"{name}.weight"] = weight + module.get_delta_weight("default").to(weight.device, weight.dtype)
        for key in [k for k in merged if k.startswith(f"{name}.lora_")]:
            del merged[key]
    return merged


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass: transformers models (non-reentrant checkpoints, which also
    work when the inputs need no gradient, as with frozen embeddings) and timm models."""
    if getattr(model, "supports_gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
