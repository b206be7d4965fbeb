"""CLIP score from a LOCAL CLIP model folder (``save_pretrained`` layout: config, weights, tokenizer, image processor).

CLIP score = 100 · max(cos(image embedding, text embedding), 0) per image, averaged: the definition of
torchmetrics' ``CLIPScore`` and of the DMD2 / SwiftBrush tables (ViT-g/14 there). It is computed here with
transformers directly (torchmetrics' class builds its processor with ``CLIPProcessor``, which insists on a CLIP
tokenizer class; any tokenizer saved in the folder works here). The image processor's own resize and crop apply.
The chance level is the score of mismatched pairs (each image against the next image's prompt).
"""

from __future__ import annotations

from pathlib import Path

import torch

from wadi_probe.errors import WadiInputError

__all__ = ["ClipScorer"]


class ClipScorer:
    """Scores (PIL image, prompt) pairs with a CLIP model loaded from ``folder`` without network."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from wadi_distill.evaluation.features import file_sha256

        folder = Path(folder).expanduser()
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        if not folder.is_dir() or not (folder / "config.json").is_file() or not weights:
            raise WadiInputError(
                f"CLIP score needs a local CLIP model folder with config.json and model.safetensors (for example "
                f"openai/clip-vit-large-patch14 saved with save_pretrained); {folder} is not one."
            )
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WadiInputError(f"{folder} is not a complete CLIP model folder ({str(exc).splitlines()[0]}).") from exc
        self.device = torch.device(device)
        self.info = {"folder": str(folder), "files": {p.name: file_sha256(p) for p in weights}}

    @torch.no_grad()
    def embeddings(self, images: list, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image and text embeddings (B, D) for a batch of PIL images and their prompts."""
        if len(images) != len(prompts):
            raise WadiInputError(f"{len(images)} images but {len(prompts)} prompts.")
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        image = self.model.get_image_features(pixel_values=pixels)
        text = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                            attention_mask=tokens["attention_mask"].to(self.device))
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        return (torch.nn.functional.normalize(image.double(), dim=-1).cpu(),
                torch.nn.functional.normalize(text.double(), dim=-1).cpu())


def clip_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score 100 · max(cos, 0) of unit embeddings (B, D)."""
    return 100.0 * (image_embeddings * text_embeddings).sum(-1).clamp_min(0)
