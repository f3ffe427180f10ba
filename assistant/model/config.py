"""The model's configuration: what to build, saved as `vlm_config.json` beside the weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "vlm_config.json"


@dataclass
class VisionConfig:
    """The vision tower: a transformers CLIP, SigLIP or BLIP-2 vision model."""

    model_type: str = "clip"  # "clip" | "siglip" | "blip2"
    # Keyword arguments of CLIPVisionConfig / SiglipVisionConfig / Blip2VisionConfig (a full config when saved).
    config: dict = field(default_factory=dict)
    # Where the initial weights come from when a model is first built: a hub id, a local
    # directory (CLIPModel, CLIPVisionModel, Siglip...), or None for random weights.
    pretrained: str | None = None
    # hidden state to read, as LLaVA (penultimate layer); a list: several, side by side; None: the last hidden
    # state after the final layer norm (BLIP-2)
    feature_layer: int | list[int] | None = -2
    drop_cls: bool = True  # drop the first position: LLaVA's "default" feature selection ("full" keeps it)
    frozen: bool = True


@dataclass
class ProjectorConfig:
    """The bridge from vision features to LLM embeddings; `type` names a registered projector."""

    type: str = "mlp2x_gelu"  # "linear" | "mlp2x_gelu" | "qformer"
    # linear / mlp2x_gelu: average-pool the patch grid to this many tokens per side (None: keep all).
    pool_grid: int | None = None
    # qformer: number of learned queries (= image tokens) and the Q-Former's size.
    num_queries: int = 32
    qformer: dict = field(default_factory=lambda: {"hidden_size": 256, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4, "intermediate_size": 1024})


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # The language model: "smollm2-135m-instruct" (bundled offline), a local directory, a .gguf
    # file, or a hub id. A checkpoint whose LLM weights were trained in full stores them in `llm/`.
    llm: str = "smollm2-135m-instruct"
    image_token: str = "<image>"
    # Where image positions go: "inline" (where the chat template puts each image: LLaVA) or "prefix" (all
    # before the prompt: BLIP-2)
    image_layout: str = "inline"
    # Image preprocessing (the CLIP/SigLIP image processor is built from these).
    image_size: int = 224
    image_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    # Said to users in the UI and the CLI: what this model is and what it is good for.
    description: str = ""
    summary: str = ""  # one line in plain words: what this model can and cannot see (the chat's header)
    trained: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"format_version"}
        if unknown:
            raise ValueError(f"unknown keys in model config: {sorted(unknown)}")
        vision = VisionConfig(**d.pop("vision", {}))
        projector = ProjectorConfig(**d.pop("projector", {}))
        d.pop("format_version", None)
        return cls(vision=vision, projector=projector, **d)

    def save(self, directory: str | Path) -> None:
        data = {"format_version": 1, **self.to_dict()}
        Path(directory, CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory, CONFIG_NAME)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from None
