"""FusionModel: image encoder + text encoder -> fusion -> task heads, with checkpoint save/load.

A checkpoint directory holds `config.json` (the model config with its task specs and the mmfusion version) and
`model.safetensors`; loading never unpickles or executes anything from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .adapters import merged_lora_state
from .config import FusionConfig, TaskSpec
from .dense import DenseInputs, probe_maps
from .errors import CheckpointError
from .files import atomic_directory
from .fusions import FusedOutput, build_fusion
from .heads import build_head, vector_temperatures
from .image_encoders import build_image_encoder
from .layers import EncoderOutput, feature_maps
from .losses import default_label_mask, matching_loss, task_loss
from .pretrained import DEFAULT_IMAGE_SIZE, dual_source, init_matching_head, resolve_pretrained
from .text_encoders import build_text_encoder

MODEL_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class FusionOutput:
    logits: dict[str, torch.Tensor]  # per task: [B, C] (regression: [B] standardised; matching: [B, B];
    # segmentation: [B, C, H, W]; dense_regression: [B, H, W] standardised, or log values with the silog loss)
    loss: torch.Tensor | None = None  # weighted sum of task losses (None without labels)
    task_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # per task, deep-supervision terms included
    fused: torch.Tensor | None = None  # [B, dim]
    extras: dict = field(default_factory=dict)  # fusion extras (gates, attention), the encoders' pooled vectors
    # and, with dense tasks, the image feature maps they read ("image_maps")


class FusionModel(nn.Module):
    """Multimodal fusion model; see `FusionConfig` for every option.

    The encoders start from their pretrained weights (`encoder_weights=False`: the architecture alone, as
    `from_pretrained` builds it before loading a checkpoint's weights). A config not yet resolved (trainer.py
    resolves it once) is resolved here (`pretrained.resolve_pretrained`), so `self.config` always rebuilds the
    model without the original files."""

    def __init__(self, config: FusionConfig, encoder_weights: bool = True) -> None:
        super().__init__()
        if not config.tasks:
            raise ValueError("FusionConfig.tasks is empty: give at least one TaskSpec")
        config = resolve_pretrained(config)
        self.config = config
        self.image_encoder = build_image_encoder(config, encoder_weights)
        self.text_encoder = build_text_encoder(config, encoder_weights)
        in_dims = {"image": self.image_encoder.out_dim, "text": self.text_encoder.out_dim}
        self.fusion = build_fusion(config, in_dims)
        self.dense = any(spec.is_dense for spec in config.tasks)  # the image encoder then gives its feature maps
        map_shapes = probe_maps(self.image_encoder, config.image_size or DEFAULT_IMAGE_SIZE) if self.dense else None
        # Learned stand-ins for an absent modality (a row with no image or no text).
        self.placeholders = nn.ParameterDict({name: nn.Parameter(torch.randn(d) * 0.02) for name, d in in_dims.items()})
        self.heads = nn.ModuleDict()
        self.aux_heads = nn.ModuleDict()  # deep supervision: task -> {depth: head}, used in training only
        for spec in config.tasks:
            depths = self.config.task_depths(spec)
            self.heads[spec.name] = build_head(spec, config, in_dims, map_shapes)
            if spec.type != "matching" and len(depths) > 1:
                self.aux_heads[spec.name] = nn.ModuleDict(
                    {str(d): build_head(spec, config, in_dims) for d in depths[:-1]}
                )
        dual = dual_source(config)
        if dual and encoder_weights:
            self._init_matching_heads(dual)
        self.aux_scale = 1.0  # multiplies every deep-supervision weight; the trainer may schedule it
        self.channels_last = False  # see use_channels_last
        self.use_channels_last()
        for encoder, frozen in ((self.image_encoder, config.freeze_image), (self.text_encoder, config.freeze_text)):
            if frozen:  # (LoRA adapters, when there are, are the only trainable part of their encoder)
                encoder.requires_grad_(False)

    def _init_matching_heads(self, source: str) -> None:
        """Matching heads of a dual encoder start from its projections, temperature and bias (zero-shot scores)."""
        from transformers import AutoModel

        dual_model = AutoModel.from_pretrained(source)
        for spec in self.config.tasks:
            if spec.type == "matching":
                init_matching_head(self.heads[spec.name], dual_model)

    def use_channels_last(self, enabled: bool = True) -> FusionModel:
        """NHWC memory layout for a CNN image encoder, on by default: faster convolutions on GPUs (1.3-1.5x in
        training) and on CPU (1.0-1.16x training, 1.0-1.33x inference; benchmarks/channels_last.py). Training,
        evaluation and prediction all run it, so their outputs agree exactly. ViTs are left as they are."""
        if not getattr(self.image_encoder, "is_vit", False):
            self.image_encoder.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
            self.channels_last = enabled
        return self

    @property
    def _no_split_modules(self) -> list[str]:
        """The classes of the model's repeated blocks (children of one class in a ModuleList or Sequential that are
        made of layers with parameters, e.g. BertLayer, Bottleneck, CNN stages, fusion layers), which accelerate's
        FSDP transformer-based wrap policy (configs/accelerate/fsdp.yaml) shards one by one."""
        names = set()
        for module in self.modules():
            if isinstance(module, (nn.ModuleList, nn.Sequential)):
                blocks = [child for child in module if any(True for _ in child.children()) and _has_parameters(child)]
                kinds = Counter(type(block).__name__ for block in blocks)
                names.update(name for name, count in kinds.items() if count > 1)
        return sorted(names)

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        return {spec.name: spec for spec in self.config.tasks}

    def train(self, mode: bool = True) -> FusionModel:
        """Frozen encoders stay in eval mode (fixed normalisation statistics, no dropout)."""
        super().train(mode)
        if self.config.freeze_image:
            self.image_encoder.eval()
        if self.config.freeze_text:
            self.text_encoder.eval()
        return self

    def _fill_absent(self, name: str, encoded: EncoderOutput, present: torch.Tensor | None) -> EncoderOutput:
        """Rows where the modality is absent get the learned placeholder as their one and only token, and zero
        feature maps for dense heads. (Always applied, even when all are present, so the placeholders take part in
        every graph as DDP expects.)"""
        if present is None:
            present = torch.ones(encoded.pooled.shape[0], dtype=torch.bool, device=encoded.pooled.device)
        placeholder = self.placeholders[name].to(encoded.pooled.dtype)
        keep = present.view(-1, 1)
        pooled = torch.where(keep, encoded.pooled, placeholder)
        first = torch.zeros_like(encoded.mask)
        first[:, 0] = True
        mask = (encoded.mask & keep) | (first & ~keep)  # bool logic, not where: onnxruntime has no bool Where
        tokens = torch.where(keep.unsqueeze(-1), encoded.tokens, placeholder * first.unsqueeze(-1))
        maps = encoded.maps and [torch.where(keep[:, :, None, None], m, 0.0) for m in encoded.maps]
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask, grid=encoded.grid, maps=maps)

    def encoder_outputs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, EncoderOutput]:
        """What the two encoders return for a batch, before absent modalities are replaced (the feature cache
        stores these). With dense tasks the image's output carries its feature maps."""
        attention_mask = attention_mask.clone()
        attention_mask[:, 0] = 1  # an empty (absent) text still gets one position, so attention is never empty
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        if self.dense and getattr(self.image_encoder, "returns_maps", False):
            image = self.image_encoder(pixel_values, maps=True)
        else:
            image = self.image_encoder(pixel_values)
        if self.dense:
            image.maps = feature_maps(image)
        return {"image": image, "text": self.text_encoder(input_ids, attention_mask)}

    def encode(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_present: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        features: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, EncoderOutput]:
        """Encoder outputs with absent modalities replaced by their placeholders; `features` are precomputed
        encoder outputs ({"image"|"text": {"pooled", "tokens", "mask"}}, from the feature cache) used instead of
        running the encoders."""
        if features is None:
            encoded = self.encoder_outputs(pixel_values, input_ids, attention_mask)
        else:
            encoded = {name: EncoderOutput(**features[name]) for name in ("image", "text")}
        return {
            "image": self._fill_absent("image", encoded["image"], image_present),
            "text": self._fill_absent("text", encoded["text"], text_present),
        }

    def _head_logits(self, head: nn.Module, fused: FusedOutput, depth: int) -> torch.Tensor:
        if fused.branches is None:
            return head(fused.layers[depth])
        return torch.stack([head(layers[depth]) for layers in fused.branches.values()]).mean(0)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: dict[str, torch.Tensor] | None = None,
        label_mask: dict[str, torch.Tensor] | None = None,
        image_present: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        output_attentions: bool = False,
        features: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> FusionOutput:
        """Images and texts in (or, with `features`, the encoders' cached outputs instead: see `encode`)."""
        if self.dense and pixel_values is None:
            raise ValueError("dense tasks need pixel_values: the image encoder's feature maps are not cached")
        encoded = self.encode(pixel_values, input_ids, attention_mask, image_present, text_present, features)
        fused = self.fusion(encoded, output_attentions=output_attentions)
        logits, embeddings, dense_aux = {}, {}, {}
        for spec in self.config.tasks:
            head = self.heads[spec.name]
            if spec.type == "matching":
                image_embedding, text_embedding = head.embed(encoded["image"].pooled, encoded["text"].pooled)
                embeddings[spec.name] = torch.cat([image_embedding, text_embedding], dim=-1)
                logits[spec.name] = head.similarity(image_embedding, text_embedding)
            elif spec.is_dense:
                size = tuple(side // spec.output_stride for side in pixel_values.shape[-2:])
                maps = head(DenseInputs(fused.features, encoded["image"].maps, encoded["text"], size))
                logits[spec.name], dense_aux[spec.name] = maps.logits, maps.aux
            else:
                logits[spec.name] = self._head_logits(head, fused, self.config.task_depths(spec)[-1])
        extras = dict(fused.extras)
        extras["pooled"] = {name: out.pooled for name, out in encoded.items()}
        extras["matching_embeddings"] = embeddings  # per matching task: [B, 2E], image then text half
        if self.dense:
            extras["image_maps"] = encoded["image"].maps
        output = FusionOutput(logits=logits, fused=fused.features, extras=extras)
        if labels is not None:
            output.task_losses = self._task_losses(fused, logits, embeddings, dense_aux, labels, label_mask or {})
            output.loss = sum(self.tasks[name].weight * loss for name, loss in output.task_losses.items())
        return output

    def _task_losses(self, fused, logits, embeddings, dense_aux, labels, label_mask) -> dict[str, torch.Tensor]:
        """Each labelled task's masked loss; in training, plus its deep-supervision heads' losses (1/2^k): heads on
        earlier fusion layers, or a dense head's outputs at earlier decoder stages; a matching task's loss then ranks
        what its head's training options add (train.matching_negatives, train.matching_memory)."""
        losses = {}
        for spec in self.config.tasks:
            if spec.name not in labels:
                continue
            target = labels[spec.name]
            mask = label_mask.get(spec.name)
            mask = default_label_mask(spec, target) if mask is None else mask.bool()
            if spec.type == "matching" and self.training:
                head, (image, text) = self.heads[spec.name], embeddings[spec.name].chunk(2, dim=-1)
                memory_logits = head.memory_logits(image, text)
                loss = matching_loss(spec, logits[spec.name], target, mask, memory_logits, head.negatives)
                head.remember(image, text, mask)
            else:
                loss = task_loss(spec, logits[spec.name], target, mask)
            for k, aux_logits in enumerate(dense_aux.get(spec.name, []), start=1):
                loss = loss + self.aux_scale * 0.5**k * task_loss(spec, aux_logits, target, mask)
            if self.training and spec.name in self.aux_heads:
                aux_depths = sorted(self.aux_heads[spec.name], key=int, reverse=True)
                for k, depth in enumerate(aux_depths, start=1):
                    aux_logits = self._head_logits(self.aux_heads[spec.name][depth], fused, int(depth))
                    loss = loss + self.aux_scale * 0.5**k * task_loss(spec, aux_logits, target, mask)
            losses[spec.name] = loss
        return losses

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ----- checkpoints -----

    def save_pretrained(self, directory: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.json + model.safetensors atomically (a temporary directory, then a rename). With
        `lora_save: merged`, LoRA adapters are folded into the encoder weights and the checkpoint is a plain model.
        `state`: the weights to write (default: this model's own; a sharded model's gathered ones)."""
        directory = Path(directory)
        config, state = self.config, self.state_dict() if state is None else state
        if config.lora_save == "merged" and (config.image_lora_rank or config.text_lora_rank):
            state = merged_lora_state(self, state)
            config = dataclasses.replace(config, image_lora_rank=0, text_lora_rank=0)
        with atomic_directory(directory) as staging:
            values = {"mmfusion_version": __version__, "architecture": "FusionModel", **config.to_dict()}
            (staging / MODEL_CONFIG_NAME).write_text(json.dumps(values, indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(state, staging / WEIGHTS_NAME, metadata={"format": "pt", "mmfusion_version": __version__})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> FusionModel:
        """Rebuild the model from `config.json` and load `model.safetensors` exactly (strict, shapes checked).
        `directory` may also be a Hugging Face Hub model id (read from the Hub cache when offline)."""
        from .hub import resolve_checkpoint

        directory = resolve_checkpoint(str(directory))
        model = cls(read_model_config(directory), encoder_weights=False)
        state = without_unread_readouts(read_weights(directory), model.state_dict())
        problems = state_dict_mismatch(model.state_dict(), state)
        if problems:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME} does not match {directory / MODEL_CONFIG_NAME}: {problems}"
            )
        model.load_state_dict(state)
        return model


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def read_model_config(directory: Path) -> FusionConfig:
    """The FusionConfig of a checkpoint directory (its config.json), checked."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    path = directory / MODEL_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"not an mmfusion checkpoint: {path} is missing")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict) or values.pop("architecture", None) != "FusionModel":
        raise CheckpointError(f"{path} is not an mmfusion FusionModel config (no 'architecture': 'FusionModel')")
    values.pop("mmfusion_version", None)
    try:
        return FusionConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights missing: {path}")
    try:
        return vector_temperatures(load_file(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def without_unread_readouts(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict:
    """Checkpoints of mmfusion 0.1 kept a cross_attention/film read-out at every fusion layer; those at layers no
    head read never received a gradient nor shaped an output, and today's model does not build them."""
    return {k: v for k, v in found.items() if k in expected or not re.match(r"fusion\.out\.\d+\.", k)}


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """Describe missing, unexpected and wrongly shaped tensors ('' when they match)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if expected[k].shape != found[k].shape
    ]
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            parts.append(f"{title} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    return "; ".join(parts)


def _head_task(key: str) -> str | None:
    """The task whose head owns state-dict entry `key` (None for encoders, fusion, placeholders)."""
    parts = key.split(".")
    return parts[1] if parts[0] in ("heads", "aux_heads") else None


def _same_task(new: TaskSpec, old: TaskSpec | None) -> bool:
    """Whether a checkpoint's head for `old` can serve `new` (same type, labels and tower)."""
    return old is not None and (old.type, old.labels, old.hidden_layers) == (new.type, new.labels, new.hidden_layers)


def reuse_tasks(tasks: list[TaskSpec], source: list[TaskSpec]) -> list[TaskSpec]:
    """`tasks` as a model starting from a checkpoint with `source` tasks builds them: a regression task whose head
    is reused keeps the checkpoint's target statistics, so the head's standardised outputs keep their meaning."""
    old = {spec.name: spec for spec in source}
    return [
        dataclasses.replace(spec, target_mean=old[spec.name].target_mean, target_std=old[spec.name].target_std)
        if spec.type in ("regression", "dense_regression") and _same_task(spec, old.get(spec.name))
        else spec
        for spec in tasks
    ]


def load_compatible(model: FusionModel, directory: Path) -> str:
    """Start `model` from a checkpoint: encoders, fusion and the heads of tasks whose type and labels are unchanged.

    New or changed tasks keep fresh heads; tasks only in the checkpoint are dropped. Returns a report.
    """
    source = read_model_config(directory)
    state = read_weights(directory)
    old_tasks = {spec.name: spec for spec in source.tasks}
    kept = [spec.name for spec in model.config.tasks if _same_task(spec, old_tasks.get(spec.name))]
    changed = [spec.name for spec in model.config.tasks if spec.name not in kept]
    target = model.state_dict()
    loadable = {
        key: tensor
        for key, tensor in state.items()
        if key in target and target[key].shape == tensor.shape and _head_task(key) not in changed
    }
    model.load_state_dict(loadable, strict=False)
    fresh = sorted({key for key in target if key not in loadable})
    dropped = sorted(set(old_tasks) - {spec.name for spec in model.config.tasks})
    lines = [
        f"init_from {directory}: loaded {len(loadable)} of {len(target)} tensors",
        f"  kept heads: {kept or 'none'}",
        f"  re-initialised heads (new or changed tasks): {changed or 'none'}",
        f"  dropped tasks (only in the checkpoint): {dropped or 'none'}",
    ]
    other = [key for key in fresh if _head_task(key) is None]
    if other:
        lines.append(
            f"  also re-initialised (no match in the checkpoint): {other[:8]}{' ...' if len(other) > 8 else ''}"
        )
    return "\n".join(lines)
