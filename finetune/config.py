"""Training recipes: one YAML file each (configs/train/), overridable from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class DataConfig:
    train: str | None = None  # LLaVA / messages JSON or JSONL (stage clip: image + caption too)
    image_root: str | None = None
    eval: str | None = None  # a held-out file; or eval_fraction of train
    eval_fraction: float = 0.0
    eval_max_samples: int = 200
    extra: list = field(default_factory=list)  # more files to mix in: [{path, image_root, repeat}]
    # Keep what the starting model knew (finetune/replay.py): "default" (the default model's own data) or a file of
    # the starting model's kind of data, mixed in at replay_share of the training tokens; none: off.
    replay: str | None = None
    replay_image_root: str | None = None
    replay_share: float = 0.2
    # The starting model's skills before and after training (finetune/skills.py), from the replay data's held-out
    # part, or the default model's when it is the starting model.
    skill_check: bool = True
    max_length: int = 1024
    skip_invalid: bool = False
    num_workers: int = 0  # DataLoader processes that read and preprocess ahead (worth it on a GPU)

    def extra_sources(self) -> list[tuple[str, str | None, int]]:
        """The `extra` entries as (path, image_root, repeat); an entry may be a bare path."""
        out = []
        for extra in self.extra:
            extra = extra if isinstance(extra, dict) else {"path": extra}
            out.append((extra["path"], extra.get("image_root"), int(extra.get("repeat", 1))))
        return out


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list = "all-linear"


@dataclass
class TrainSettings:
    output_dir: str = "runs/model"
    max_steps: int = 0  # 0: run `epochs` epochs
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4  # LoRA / LLM
    projector_lr: float | None = None  # default: lr
    vision_lr: float | None = None  # default: lr / 10 when the vision tower is trained
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    save_every: int = 200
    eval_every: int = 200
    log_every: int = 10
    keep_checkpoints: int = 2
    quantize: str | None = None  # "4bit" -> QLoRA
    max_minutes: float = 0  # stop (and save) after this much training wall time, resumes included; 0: no limit
    # "steps": warmup + cosine over max_steps (or the epochs); "minutes": over max_minutes of wall time,
    # so a run bounded by a time budget still anneals to zero (finetune/schedule.py)
    schedule: str = "steps"
    num_threads: int = 0  # torch threads on CPU; 0: leave torch's default
    # "auto": bf16 autocast where bf16 is fast (a CUDA GPU with it, a CPU with AMX or AVX-512 BF16), fp32 elsewhere
    # (assistant/cpu/policy.py); "no" | "bf16" | "fp16" as accelerate takes them
    mixed_precision: str = "auto"


@dataclass
class TrainConfig:
    stage: str = "instruct"  # "clip" | "align" | "instruct"
    # Where the model comes from: a model spec (`default`, one of our checkpoints, a llava-hf or BLIP-2 dir)
    # or null with `model_config` describing a new composition.
    init: str | None = "default"
    model_config: dict | None = None
    # What trains: vision "frozen" | "full"; projector "frozen" | "full"; llm "frozen" | "lora" | "full".
    vision: str = "frozen"
    projector: str = "full"
    llm: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    # stage clip only: the text tower and CLIP settings
    clip: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        choices = {"stage": ("clip", "align", "instruct"), "vision": ("frozen", "full"),
                   "projector": ("frozen", "full"), "llm": ("frozen", "lora", "full")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config: {key} must be one of {allowed}, not {getattr(self, key)!r}")
        if not self.data.train:
            raise ValueError("config: data.train is required (or --data FILE)")
        if self.train.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"config: train.mixed_precision must be auto, no, bf16 or fp16, not "
                             f"{self.train.mixed_precision!r}")
        if not 0 <= self.data.replay_share < 1:
            raise ValueError(f"config: data.replay_share is the share of replayed tokens, from 0 to below 1, not "
                             f"{self.data.replay_share}")
        replay = self.data.replay
        if replay not in (None, "", "none", "no", "null", "default") and not Path(replay).is_file():
            raise ValueError(f"config: data.replay = {replay!r}: no such file (give 'default', a data file or none)")
        if self.train.schedule not in ("steps", "minutes"):
            raise ValueError(f"config: train.schedule must be 'steps' or 'minutes', not {self.train.schedule!r}")
        if self.train.schedule == "minutes" and not self.train.max_minutes:
            raise ValueError("config: train.schedule: minutes needs train.max_minutes (the time to anneal over)")
        if self.train.quantize and self.llm == "full":
            raise ValueError("config: a quantized (QLoRA) LLM can only be trained with llm: lora")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: dict, where: str, prefix: str = ""):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        names = ", ".join(prefix + k for k in sorted(unknown))
        raise ValueError(f"{where}: unknown key(s) {names}; known here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        sub = {"lora": LoraSettings, "data": DataConfig, "train": TrainSettings}.get(name) if cls is TrainConfig else None
        if sub is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {name} must be a mapping, not {value!r}")
            value = _build(sub, value, where, f"{prefix}{name}.")
        else:
            value = coerce(value, known[name].type, f"{where}: {prefix}{name}")
        kwargs[name] = value
    return cls(**kwargs)


def coerce(value, annotation: str, where: str):
    """`value` as the field's declared type (`float`, `int | None`, `str | list`...): YAML reads `1e-4` as a string
    and `100.0` as a float; both become what the field holds. Anything else is an error naming key, value and type."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"{where} = null, but it must be {_describe(kinds)}")
    for kind in kinds:
        if kind == "float" and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    continue
        if kind == "int" and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "str" and isinstance(value, bool):  # YAML 1.1 reads no / yes / off / on as booleans
            return "yes" if value else "no"
        if kind == "str" and isinstance(value, (str, int, float)):
            return str(value)
        if kind in ("list", "dict") and isinstance(value, {"list": list, "dict": dict}[kind]):
            return value
    raise ValueError(f"{where} = {value!r}, but it must be {_describe(kinds)}")


def _describe(kinds) -> str:
    names = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "a string",
             "list": "a list", "dict": "a mapping", "None": "null"}
    return " or ".join(names.get(k, k) for k in kinds)


def set_key(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {k} is not a mapping")
    node[keys[-1]] = value


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file + `key.sub=value` overrides (values parsed as YAML: numbers, booleans, lists)."""
    data = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        set_key(data, key.strip(), yaml.safe_load(raw))
    try:
        return _build(TrainConfig, data, path or "config")
    except TypeError as e:
        raise ValueError(f"{path or 'config'}: {e}") from None
