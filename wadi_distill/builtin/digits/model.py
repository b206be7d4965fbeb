"""``builtin:digits``: a small class-conditional diffusion model that ships, and its files.

:class:`DigitsModel` is the model bundle (UNet, scheduler, prompt encoder) that trains, samples and is scored;
the distiller sees it, like every pipeline folder, as a :class:`wadi_distill.teachers.pipeline.Teacher`
(``load_teacher("builtin:digits")``).

``builtin:digits`` is built from the same diffusers classes as Stable Diffusion: a ``UNet2DConditionModel`` with
cross-attention on prompt embeddings, a ``DDPMScheduler`` with SD's noise schedule (scaled-linear betas
0.00085..0.012, 1000 steps, ε-prediction), and a prompt encoder. The encoder is a small learned token table
(the project's stand-in for CLIP): prompts such as ``"a handwritten digit 7"`` and the empty prompt ``""`` (the
null prompt classifier-free guidance uses) become (B, L, D) embeddings.

Files (the shipped ones live in ``wadi_distill/builtin/digits/``; ``wadi-distill train-teacher -o DIR`` writes the same):

- ``digits_unet.safetensors``: the UNet's state dict under plain diffusers names (a probe can read it directly);
- ``digits_text_encoder.safetensors``: the prompt encoder's weights;
- ``digits_teacher.json``: the configs of all three parts plus how the weights were made (command, seed,
  data split, wall time, metrics at training time).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from wadi_probe.io.atomic import atomic_path, write_json_atomic
from wadi_probe.io.formats.safetensors_io import write_safetensors
from wadi_probe.errors import WadiInputError
from wadi_probe.text import plural, quoted
from wadi_probe.io.jsonfile import read_json

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("digits",)
BUILTIN_DIR = Path(__file__).resolve().parent

UNET_FILE = "digits_unet.safetensors"
TEXT_ENCODER_FILE = "digits_text_encoder.safetensors"
TEACHER_CONFIG_FILE = "digits_teacher.json"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATE = "a handwritten digit {digit}"
NULL_PROMPT = ""

DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}

DEFAULT_TEXT_ENCODER_CONFIG: dict[str, Any] = {"embedding_dim": 32, "max_length": 8}


def _base_vocabulary() -> dict[str, int]:
    """Word -> token id. Digits written as numerals or words share one token each."""
    words = ["<pad>", "<start>", "<end>", "a", "an", "the", "handwritten", "digit", "number", "of", "written"]
    vocab = {word: i for i, word in enumerate(words)}
    for value, name in enumerate(DIGIT_WORDS):
        vocab[str(value)] = len(words) + value
        vocab[name] = len(words) + value
    return vocab


class DigitPromptEncoder(nn.Module):
    """A learned token table with position embeddings: the prompt encoder of ``builtin:digits``.

    Each prompt becomes ``<start> words... <end> <pad>...`` of fixed length ``max_length``; the embedding of a
    token is its table row plus its position row, layer-normalised. The empty prompt keeps its start/end/pad
    tokens, so, like CLIP's empty-prompt embedding, it is a learned "no condition" signal rather than zeros.
    """

    def __init__(self, embedding_dim: int = 32, max_length: int = 8) -> None:
        super().__init__()
        self.vocabulary = _base_vocabulary()
        self.embedding_dim = embedding_dim
        self.max_length = max_length
        self.token_embedding = nn.Embedding(max(self.vocabulary.values()) + 1, embedding_dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, embedding_dim))
        self.norm = nn.LayerNorm(embedding_dim)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding, std=0.1)

    @property
    def config(self) -> dict[str, int]:
        return {"embedding_dim": self.embedding_dim, "max_length": self.max_length}

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Turn prompts into token ids (B, max_length); unknown words or too-long prompts raise WadiInputError."""
        if isinstance(prompts, str):
            raise WadiInputError("Prompts must be a list of strings, not a single string.")
        ids = torch.full((len(prompts), self.max_length), self.vocabulary["<pad>"], dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", str(prompt).lower())
            unknown = list(dict.fromkeys(w for w in words if w not in self.vocabulary))
            if unknown:
                shown = ", ".join(quoted(w, 40) for w in unknown[:5])
                more = f" and {plural(len(unknown) - 5, 'other')}" if len(unknown) > 5 else ""
                raise WadiInputError(
                    f"The digits prompt encoder does not know the word(s) {shown}{more}; "
                    f"use prompts like {PROMPT_TEMPLATE.format(digit=7)!r} or the empty prompt.")
            tokens = ["<start>", *words, "<end>"]
            if len(tokens) > self.max_length:
                raise WadiInputError(
                    f"The prompt {quoted(prompt)} has {len(words):,} words; the digits prompt encoder takes at most "
                    f"{self.max_length - 2}.")
            ids[row, : len(tokens)] = torch.tensor([self.vocabulary[t] for t in tokens])
        return ids

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embed token ids (B, L) into (B, L, D)."""
        x = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        return self.norm(x)


@dataclass
class DigitsModel:
    """The digits model: UNet, noise scheduler and prompt encoder, plus how it was made."""

    unet: UNet2DConditionModel
    text_encoder: DigitPromptEncoder
    scheduler: DDPMScheduler
    name: str = "digits"
    metadata: dict[str, Any] = field(default_factory=dict)
    null_prompt: str = NULL_PROMPT

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def num_classes(self) -> int:
        return len(DIGIT_WORDS)

    @property
    def class_prompts(self) -> list[str]:
        """The prompt of each class, index = digit."""
        return [self.prompts_for_class(k) for k in range(self.num_classes)]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def prompts_for_class(self, digit: int) -> str:
        """The prompt that asks for ``digit`` (0..9)."""
        if not 0 <= int(digit) < self.num_classes:
            raise WadiInputError(f"Digit classes are 0..9, not {digit}.")
        return PROMPT_TEMPLATE.format(digit=int(digit))

    def prompts_for_labels(self, labels: torch.Tensor | list[int]) -> list[str]:
        """One prompt per label."""
        return [self.prompts_for_class(int(k)) for k in labels]

    def encode_prompts(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Prompt embeddings (B, L, D) on the UNet's device and dtype (or ``device``)."""
        target = torch.device(device) if device is not None else self.device
        encoder_device = next(self.text_encoder.parameters()).device
        ids = self.text_encoder.tokenize(prompts).to(encoder_device)
        return self.text_encoder(ids).to(device=target, dtype=self.unet.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DigitsModel":
        """Move UNet and encoder (in place) and return self."""
        if dtype is not None:
            self.unet.to(device=device, dtype=dtype)
        else:
            self.unet.to(device=device)
        self.text_encoder.to(device=device)
        return self

    def eval(self) -> "DigitsModel":
        self.unet.eval()
        self.text_encoder.eval()
        return self

    def requires_grad_(self, flag: bool) -> "DigitsModel":
        self.unet.requires_grad_(flag)
        self.text_encoder.requires_grad_(flag)
        return self


def build_teacher(unet_config: dict[str, Any] | None = None, text_encoder_config: dict[str, Any] | None = None,
                  scheduler_config: dict[str, Any] | None = None, *, seed: int = 0) -> DigitsModel:
    """A freshly initialised digits teacher (random weights, seeded), e.g. to train or for tests."""
    unet_config = dict(DEFAULT_UNET_CONFIG if unet_config is None else unet_config)
    text_config = dict(DEFAULT_TEXT_ENCODER_CONFIG if text_encoder_config is None else text_encoder_config)
    if text_config["embedding_dim"] != unet_config["cross_attention_dim"]:
        raise WadiInputError("The prompt encoder's embedding_dim must equal the UNet's cross_attention_dim.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        text_encoder = DigitPromptEncoder(**text_config)
    scheduler = DDPMScheduler(**dict(DEFAULT_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config))
    return DigitsModel(unet=unet, text_encoder=text_encoder, scheduler=scheduler)


def is_builtin(spec: str | Path) -> bool:
    """True for ``"builtin:<name>"`` with a known built-in name (e.g. ``"builtin:digits"``)."""
    return isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX) and spec[len(BUILTIN_PREFIX):] in BUILTIN_NAMES


def save_teacher(teacher: DigitsModel, directory: str | Path, *, metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write the teacher's three files into ``directory`` (atomically each) and return the folder.

    Weights are stored in ``dtype`` (fp16 keeps the shipped UNet under 2 MB); loading casts back to fp32.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for module, filename in ((teacher.unet, UNET_FILE), (teacher.text_encoder, TEXT_ENCODER_FILE)):
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
        with atomic_path(directory / filename) as tmp:
            write_safetensors(tensors, tmp, metadata={"format": "pt"})
    record = {
        "name": teacher.name,
        "unet_config": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in teacher.unet.config.items() if k in DEFAULT_UNET_CONFIG},
        "text_encoder_config": teacher.text_encoder.config,
        "scheduler_config": {k: teacher.scheduler.config[k] for k in DEFAULT_SCHEDULER_CONFIG},
        "weights_dtype": str(dtype).replace("torch.", ""),
        **(metadata if metadata is not None else teacher.metadata),
    }
    write_json_atomic(directory / TEACHER_CONFIG_FILE, record)
    return directory


def load_teacher_dir(directory: str | Path, device: torch.device | str = "cpu") -> DigitsModel:
    """Load a teacher written by :func:`save_teacher` (or ``wadi-distill train-teacher``), in fp32, eval mode."""
    directory = Path(directory)
    missing = [f for f in (TEACHER_CONFIG_FILE, UNET_FILE, TEXT_ENCODER_FILE) if not (directory / f).is_file()]
    if missing:
        raise WadiInputError(f"{directory} is not a digits teacher folder: {', '.join(missing)} missing.")
    try:
        record = read_json(directory / TEACHER_CONFIG_FILE)
        teacher = build_teacher(record["unet_config"], record["text_encoder_config"], record["scheduler_config"])
        unet_state = load_file(str(directory / UNET_FILE))
        text_state = load_file(str(directory / TEXT_ENCODER_FILE))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise WadiInputError(f"Could not read the digits teacher in {directory}: {exc}.") from exc
    _load_state(teacher.unet, unet_state, directory / UNET_FILE)
    _load_state(teacher.text_encoder, text_state, directory / TEXT_ENCODER_FILE)
    teacher.metadata = {k: v for k, v in record.items()
                        if k not in ("unet_config", "text_encoder_config", "scheduler_config")}
    return teacher.to(device).eval()


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise WadiInputError(f"The weights in {path} do not match the model described by its config.")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load_builtin(name: str = "digits", device: torch.device | str = "cpu") -> DigitsModel:
    """Load a built-in teacher shipped inside the package (``"digits"`` or ``"builtin:digits"``), offline."""
    key = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    if key not in BUILTIN_NAMES:
        raise WadiInputError(f"There is no built-in model {name!r}; available: "
                             f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)}.")
    if not (BUILTIN_DIR / UNET_FILE).is_file():
        raise WadiInputError(f"The built-in {key} weights are missing from {BUILTIN_DIR}; reinstall the package "
                             "or run `wadi-distill train-teacher`.")
    return load_teacher_dir(BUILTIN_DIR, device=device)


def load_digits(spec: str | Path, device: torch.device | str = "cpu") -> DigitsModel:
    """Load the :class:`DigitsModel` of ``"builtin:digits"`` or of a folder written by ``wadi-distill train-teacher``
    (the distiller wraps it with :func:`wadi_distill.teachers.pipeline.load_teacher`)."""
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        return load_builtin(spec, device=device)
    path = Path(spec)
    if not path.exists():
        raise WadiInputError(f"No teacher at {path}: give builtin:digits or a folder from train-teacher.")
    return load_teacher_dir(path, device=device)
