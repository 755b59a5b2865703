"""Reading a run configuration: a YAML file, then dotted command-line overrides (`--model.fusion gated`), then
checks of values that parse but make no sense, each named by its option."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import tyro
import yaml

from .config import Config, from_dict


def load_yaml(path: str | Path) -> Config:
    """Read a YAML config file into a `Config`, naming the file and key of anything invalid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    values.pop("config", None)
    return from_dict(Config, values, where=str(path))


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> Config:
    """`--config file.yaml` (optional) then dotted overrides such as `--model.fusion gated`; exits 2 on errors."""
    argv = sys.argv[1:] if argv is None else list(argv)
    base = Config()
    path = _option_value(argv, "--config")
    if path is None and _option_value(argv, "--data.path") is None and DEFAULT_RECIPE.is_file():
        path = str(DEFAULT_RECIPE)
    if path is not None:
        try:
            base = load_yaml(path)
        except (OSError, ValueError) as error:
            raise SystemExit(f"{prog}: error: {error}") from None
        base.config = path
    config = tyro.cli(
        Config,
        default=base,
        args=_normalise_booleans(argv),
        prog=prog,
        use_underscores=True,
        config=(tyro.conf.FlagConversionOff,),
    )
    problems = check_values(config) + _unread_options(argv, config)
    if problems:
        raise SystemExit(f"{prog}: error: " + "; ".join(problems))
    return config


BOOLEAN_WORDS = {"true": "True", "yes": "True", "1": "True", "false": "False", "no": "False", "0": "False"}


def _boolean_options(cls: type = Config, prefix: str = "--") -> set[str]:
    options = set()
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:
            options.add(prefix + f.name)
        elif dataclasses.is_dataclass(hint):
            options |= _boolean_options(hint, f"{prefix}{f.name}.")
    return options


def _normalise_booleans(argv: list[str]) -> list[str]:
    """Accept `--data.augment false` (any case, yes/no, 1/0) as well as tyro's `False`."""
    booleans = _boolean_options()
    return [BOOLEAN_WORDS.get(arg.lower(), arg) if i and argv[i - 1] in booleans else arg for i, arg in enumerate(argv)]


def _option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


UNCERTAINTY_OPTIONS = ("uncertainty_start", "uncertainty_max_weight", "uncertainty_regression_max_weight")
"""Training options only `--train.loss_weighting uncertainty` reads."""


def _unread_options(argv: list[str], config: Config) -> list[str]:
    """Uncertainty's options given on the command line with another weighting, which would ignore them (a saved
    config holds every option, so only the command line is checked)."""
    train = config.train
    return [
        f"--train.{name} {getattr(train, name)} applies to --train.loss_weighting uncertainty,"
        f" not {train.loss_weighting}"
        for name in UNCERTAINTY_OPTIONS
        if train.loss_weighting != "uncertainty" and _option_value(argv, f"--train.{name}") is not None
    ]


def check_values(config: Config) -> list[str]:
    """Values that parse but make no sense, each named by its option."""
    train, data, model = config.train, config.data, config.model
    rules = [
        (train.batch_size > 0, f"--train.batch_size must be > 0, got {train.batch_size}"),
        (train.eval_batch_size > 0, f"--train.eval_batch_size must be > 0, got {train.eval_batch_size}"),
        (train.lr > 0, f"--train.lr must be > 0, got {train.lr}"),
        (train.encoder_lr >= 0, f"--train.encoder_lr must be >= 0, got {train.encoder_lr}"),
        (train.epochs >= 0, f"--train.epochs must be >= 0 (0: from the data size), got {train.epochs}"),
        (train.epochs_at_3000_rows > 0, f"--train.epochs_at_3000_rows must be > 0, got {train.epochs_at_3000_rows}"),
        (0 < train.min_epochs <= 30, f"--train.min_epochs must be in (0, 30], got {train.min_epochs}"),
        (train.max_steps >= 0, f"--train.max_steps must be >= 0, got {train.max_steps}"),
        (train.grad_accumulation >= 1, f"--train.grad_accumulation must be >= 1, got {train.grad_accumulation}"),
        (0 <= train.warmup_ratio < 1, f"--train.warmup_ratio must be in [0, 1), got {train.warmup_ratio}"),
        (0 <= train.modality_dropout < 1, f"--train.modality_dropout must be in [0, 1), got {train.modality_dropout}"),
        (train.max_grad_norm >= 0, f"--train.max_grad_norm must be >= 0, got {train.max_grad_norm}"),
        (train.gradnorm_alpha >= 0, f"--train.gradnorm_alpha must be >= 0, got {train.gradnorm_alpha}"),
        (
            0 < train.gradnorm_min_weight < 1,
            f"--train.gradnorm_min_weight must be in (0, 1), got {train.gradnorm_min_weight}",
        ),
        (
            0 <= train.regression_warmup <= 1,
            f"--train.regression_warmup must be in [0, 1], got {train.regression_warmup}",
        ),
        (
            not train.regression_warmup or train.loss_weighting != "gls",
            "--train.regression_warmup does not apply to --train.loss_weighting gls (one geometric mean of all "
            "the losses); choose another weighting or leave it at 0",
        ),
        (train.matching_memory >= 0, f"--train.matching_memory must be >= 0, got {train.matching_memory}"),
        (train.weighting_lr >= 0, f"--train.weighting_lr must be >= 0 (0: lr), got {train.weighting_lr}"),
        (0 <= train.label_smoothing < 1, f"--train.label_smoothing must be in [0, 1), got {train.label_smoothing}"),
        (train.class_balance >= 0, f"--train.class_balance must be >= 0, got {train.class_balance}"),
        (0 <= train.nll_noise_decay < 1, f"--train.nll_noise_decay must be in [0, 1), got {train.nll_noise_decay}"),
        (
            not train.nll_noise_decay or train.loss_weighting == "nll",
            f"--train.nll_noise_decay applies to --train.loss_weighting nll, not {train.loss_weighting}",
        ),
        (
            train.uncertainty_max_weight >= 0,
            f"--train.uncertainty_max_weight must be >= 0 (0: no bound), got {train.uncertainty_max_weight}",
        ),
        (
            train.uncertainty_regression_max_weight >= 0,
            "--train.uncertainty_regression_max_weight must be >= 0 (0: no bound), "
            f"got {train.uncertainty_regression_max_weight}",
        ),
        (
            train.freeze_encoders_steps >= 0,
            f"--train.freeze_encoders_steps must be >= 0, got {train.freeze_encoders_steps}",
        ),
        (train.log_every >= 1, f"--train.log_every must be >= 1, got {train.log_every}"),
        (train.time_limit >= 0, f"--train.time_limit must be >= 0, got {train.time_limit}"),
        (
            train.early_stopping_patience >= 0,
            f"--train.early_stopping_patience must be >= 0, got {train.early_stopping_patience}",
        ),
        (train.keep_checkpoints >= 1, f"--train.keep_checkpoints must be >= 1, got {train.keep_checkpoints}"),
        (0 < data.val_fraction < 1, f"--data.val_fraction must be in (0, 1), got {data.val_fraction}"),
        (data.max_text_length > 0, f"--data.max_text_length must be > 0, got {data.max_text_length}"),
        (0 < data.crop_area <= 1, f"--data.crop_area must be in (0, 1], got {data.crop_area}"),
        (data.num_workers is None or data.num_workers >= 0, f"--data.num_workers must be >= 0, got {data.num_workers}"),
        (
            not (data.streaming and data.num_workers),
            "--data.num_workers must be 0 with --data.streaming true: a stream is read in the main process, "
            "where its row numbers and skipped-row counts are kept",
        ),
        (
            not (data.streaming and data.cache),
            "--data.cache needs map-style data: a stream is read once per epoch and is not cached "
            "(drop --data.cache or --data.streaming)",
        ),
        (
            not (data.cache and any(spec.is_dense for spec in config.tasks)),
            "--data.cache does not serve dense tasks: their masks are cut by the original image's crop box, which "
            "the cached (or device-made) training crops only approximate (drop --data.cache)",
        ),
        (data.shuffle_buffer >= 0, f"--data.shuffle_buffer must be >= 0, got {data.shuffle_buffer}"),
        (model.dim > 0, f"--model.dim must be > 0, got {model.dim}"),
        (model.decoder_dim > 0, f"--model.decoder_dim must be > 0, got {model.decoder_dim}"),
        (0 <= model.dropout < 1, f"--model.dropout must be in [0, 1), got {model.dropout}"),
        (
            0 <= model.regression_dropout < 1,
            f"--model.regression_dropout must be in [0, 1), got {model.regression_dropout}",
        ),
        (model.image_size is None or model.image_size > 0, f"--model.image_size must be > 0, got {model.image_size}"),
        (
            model.image_encoder not in ("timm", "hf") or model.image_model or model.pretrained,
            f"--model.image_encoder {model.image_encoder} needs --model.image_model (a name, path or Hub id)",
        ),
        (
            model.pretrained is None or model.pretrained.startswith("clip:") and len(model.pretrained) > 5,
            f"--model.pretrained must be clip:PATH_OR_ID, got {model.pretrained!r}",
        ),
        (
            model.text_pooling != "pooler" or model.text_encoder == "hf" or model.pretrained,
            "--model.text_pooling pooler needs an hf text encoder (its model's own pooled output)",
        ),
        (model.image_lora_rank >= 0, f"--model.image_lora_rank must be >= 0, got {model.image_lora_rank}"),
        (model.text_lora_rank >= 0, f"--model.text_lora_rank must be >= 0, got {model.text_lora_rank}"),
        (
            not model.image_lora_rank or model.image_encoder in ("timm", "hf") or model.pretrained,
            "--model.image_lora_rank needs a timm or hf image encoder (or --model.pretrained)",
        ),
        (
            not model.text_lora_rank or model.text_encoder == "hf" or model.pretrained,
            "--model.text_lora_rank needs an hf text encoder (or --model.pretrained)",
        ),
        (
            not (model.image_lora_rank and model.freeze_image) and not (model.text_lora_rank and model.freeze_text),
            "LoRA adapters train inside the encoder: drop --model.freeze_image/--model.freeze_text for an encoder "
            "with a LoRA rank",
        ),
        (0 < train.layer_decay <= 1, f"--train.layer_decay must be in (0, 1], got {train.layer_decay}"),
        (
            not (train.cache_features and (model.image_lora_rank or model.text_lora_rank)),
            "--train.cache_features true needs fixed encoders; LoRA adapters change their outputs",
        ),
        (
            not (train.cache_features and data.streaming),
            "--train.cache_features true needs a map-style dataset, not --data.streaming true",
        ),
        (data.crop_pct is None or 0 < data.crop_pct <= 1, f"--data.crop_pct must be in (0, 1], got {data.crop_pct}"),
        (
            all(len(v or [0, 0, 0]) == 3 for v in (data.image_mean, data.image_std)),
            "--data.image_mean and --data.image_std take 3 values (R G B)",
        ),
    ]
    return [message for ok, message in rules if not ok]
