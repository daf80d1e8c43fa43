"""One typed config tree for mmdist: ``load_config("demo", ["train.lr=3e-4"])`` reads a preset
or YAML file and dotted overrides into a :class:`Config` (pydantic models: types, choices, bounds,
rules beside the fields, derived values as properties) or raises every problem at once."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mmdist import registry
from mmdist.config_io import build, flatten, read_text, read_yaml, report, space_problems
from mmdist.config_parts import COMPONENTS, LORA_COMPONENTS, part_problems

CONFIG_DIR = Path(__file__).parent / "configs"

# Choices, read by the CLI help and sweep defaults and typing the fields: tasks, fusion methods
# and encoders come from the registry (one entry there adds a name here).
TASKS = tuple(registry.TASKS)
SIZES = ("tiny", "small", "base", "1b", "7b")
MODALITIES = ("text", "image", "audio", "video")
FUSIONS = tuple(registry.FUSIONS)
FUSION_STAGES = ("early", "mid", "late")
TEXT_ENCODERS = registry.TEXT_ENCODERS
IMAGE_ENCODERS = registry.IMAGE_ENCODERS
AUDIO_ENCODERS = registry.AUDIO_ENCODERS
VIDEO_TEMPORALS = registry.VIDEO_TEMPORALS
DECODERS = registry.DECODERS
LM_CONDITIONING = ("prefix", "cross_attention")
VQA_ANSWERS = ("generate", "classify")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("asha", "fifo")
SEARCH_ALGS = ("random", "grid")
# what `mmdist train` generates without data.path (`mmdist prepare --source` names; data.generated)
SYNTHETIC_SOURCES = ("synthetic", "digits", "mmt", "synthetic_video")
LOWER_IS_BETTER = ("_loss", "_perplexity")  # metric name endings where lower is better


def fusion_class(name: str) -> Any:
    """The fusion method registered as ``name`` (``mmdist.models.fusion``; imports torch)."""
    return registry.load(registry.FUSIONS, name, "fusion")


def task_class(name: str) -> Any:
    """The task registered as ``name`` (``mmdist.tasks``; imports torch on first use)."""
    return registry.load(registry.TASKS, name, "task")


def torchvision_file(path: str) -> bool:
    """Whether ``model.image_pretrained`` names a file of torchvision weights (a directory, or
    a path not there yet without the suffix, is a Hugging Face model's)."""
    return Path(path).is_file() or path.endswith(".safetensors")


class ConfigError(ValueError):
    """A config with one or more problems; ``problems`` lists each as ``key: message``."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems, self.source = list(problems), source
        head = f"invalid config{f' ({source})' if source else ''}: {len(problems)} problem(s)"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))

    def __reduce__(self):  # rebuilt from its problems after crossing a process (Ray)
        return (type(self), (self.problems, self.source))


class Section(BaseModel):
    """Strict types, no unknown keys; CLI text is read as YAML for the field's type first."""

    model_config = ConfigDict(extra="forbid", strict=True)
    _read_text = field_validator("*", mode="before")(read_text)


class DataConfig(Section):
    """Where the shards are and how rows become tensors."""

    path: str | None = None  # shard directory written by `mmdist prepare`; None -> synthetic
    synthetic_samples: int = Field(2000, ge=1)  # rows generated when path is None
    # the source generated when path is None; None: synthetic_video if the model reads video,
    # else synthetic
    synthetic_source: Literal[SYNTHETIC_SOURCES] | None = None
    val_fraction: float = Field(0.1, ge=0, lt=1)
    image_size: int = Field(64, ge=1)  # square side after resize/crop, pixels
    sample_rate: int = Field(16000, ge=1)  # audio is resampled to this rate, Hz
    audio_seconds: float = Field(1.0, gt=0)  # clips are cut or padded to this length
    n_mels: int = Field(32, ge=1)  # log-mel bins
    hop_length: int = Field(160, ge=1)  # samples between spectrogram frames
    max_text_len: int = Field(32, ge=4, description="special tokens need room")  # tokens
    vocab_size: int = Field(2000, ge=1)  # size of a tokenizer trained locally on the train text
    # local pretrained tokenizer directory instead of training one; None with
    # model.decoder_pretrained: the LM's own (Config.tokenizer_path)
    tokenizer: str | None = None
    augment: bool = False  # random crop/flip of images in training
    feature_cache: Literal["off", "auto", "require"] = "off"  # frozen encoders: feature_cache.py
    shard_rows: int = Field(1000, ge=1)  # target rows per Parquet shard
    # `mmdist prepare` quarantines rows past these (decompression bombs, endless audio, a
    # caption that is a whole book)
    max_image_pixels: int = Field(40_000_000, ge=1)  # width x height of a source image
    max_audio_seconds: float = Field(600.0, gt=0)  # duration of a source clip
    max_text_chars: int = Field(20_000, ge=1)  # characters of a text or target
    max_video_seconds: float = Field(3600.0, gt=0)  # duration of a source video
    # video: K frames per clip, sampled uniformly over the clip, or at video_fps frames per
    # second from its start (at most K); stored at image_size (mmdist.data.video)
    video_frames: int = Field(8, ge=1)
    video_fps: float | None = Field(None, gt=0)
    cpus_per_task: float = Field(0.5, gt=0)  # per Ray Data task; a fraction fits beside workers
    deterministic: bool = True  # same seed -> same order on every rank; false: blocks as they come


class LoraConfig(Section):
    """LoRA adapters (peft) on pretrained parts; merged into plain weights at consolidation."""

    r: int = Field(8, ge=1)  # rank
    alpha: float = Field(16.0, gt=0)  # scaling alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    # peft's module names (q_proj,v_proj), or all-linear: every linear layer but the output head
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)
    components: list[Literal[LORA_COMPONENTS]] = Field(default_factory=lambda: ["decoder"],
                                                       min_length=1)


class ModelConfig(Section):
    """The fused model: encoders, fusion method and stage, task head."""

    task: Literal[TASKS] = "itm"
    size: Literal[SIZES] = "small"
    # video is opt-in: a model reads it only when listed
    modalities: list[Literal[MODALITIES]] = Field(
        default_factory=lambda: ["text", "image", "audio"], min_length=1)
    fusion: Literal[FUSIONS] = "concat"
    fusion_stage: Literal[FUSION_STAGES] = "mid"
    text_encoder: Literal[TEXT_ENCODERS] = "lstm"
    image_encoder: Literal[IMAGE_ENCODERS] = "cnn"
    audio_encoder: Literal[AUDIO_ENCODERS] = "conv"
    # video: model.image_encoder (and model.image_pretrained) per frame, then across time:
    # mean (no order), transformer (over per-frame vectors), tokens (every frame's tokens)
    video_temporal: Literal[VIDEO_TEMPORALS] = "transformer"
    decoder: Literal[DECODERS] = "gpt2"  # the decoder LM for task lm/vqa/multitask
    lm_conditioning: Literal[LM_CONDITIONING] = "prefix"
    vqa_answer: Literal[VQA_ANSWERS] = "generate"  # answer with the decoder, or classify it
    hidden_size: int = Field(0, ge=0, description="0 = from model.size")
    num_classes: int = Field(0, ge=0, description=(
        "classes of the classify head (and of vqa_answer=classify); 0 = from the data: its "
        "largest label + 1"))
    modality_dropout: float = Field(0.0, ge=0, lt=1)  # P(drop a non-text modality) per sample
    # itm / contrastive: the two modalities matched, e.g. [image, audio]; [] -> text vs the rest
    match: list[Literal[MODALITIES]] = Field(default_factory=list)
    hard_negatives: bool = True  # itm: also negatives with one modality swapped (see itm.py)
    align_weight: float = Field(1.0, ge=0, description="itm: align before fuse; 0 = off")
    # Auxiliary per-modality classification on the data's label_image / label_audio columns:
    # modality -> classes; {} -> from the data when it has them (training fills it in).
    aux_classes: dict[str, int] = Field(default_factory=dict)
    aux_weight: float = Field(1.0, ge=0, description="0 = no auxiliary objectives")
    task_weights: dict[str, float] = Field(default_factory=dict)  # multitask loss weights
    # Pretrained parts, each a local directory as save_pretrained writes (nothing is downloaded)
    decoder_pretrained: str | None = None  # any AutoModelForCausalLM; its tokenizer is the run's
    text_pretrained: str | None = None  # any AutoModel text encoder (BERT, RoBERTa, MiniLM, ...)
    image_pretrained: str | None = None  # CLIP/SigLIP/ViT/DINOv2 dir, or torchvision .safetensors
    audio_pretrained: str | None = None  # Whisper, wav2vec2, HuBERT or AST directory
    # modality -> most tokens it hands to fusion (average-pooled); {} -> all of them
    modality_tokens: dict[str, int] = Field(default_factory=dict)
    freeze: list[Literal[COMPONENTS]] = Field(default_factory=list)  # not trained, no optimizer
    lora: LoraConfig | None = None  # LoRA on the pretrained LM (and optionally encoders)
    init_from: str | None = None  # start from a registered model: models:/NAME@ALIAS, runs:/...
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each repeated block (models/regional_compile.py)

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> ModelConfig:
        mods = self.modalities
        return report(self, info, [
            (len(set(mods)) != len(mods), f"model.modalities={mods}: listed twice"),
            (bool(self.match) and (len(self.match) != 2 or len(set(self.match)) != 2
                                    or not set(self.match) <= set(mods)),
             f"model.match={self.match}: two different modalities of model.modalities={mods}"),
            *((m not in mods or m == "text" or n < 2, f"model.aux_classes.{m}={n}: needs a "
               f"non-text modality of model.modalities={mods} and >= 2 classes")
              for m, n in self.aux_classes.items()),
            *((True, p) for p in task_class(self.task).config_problems(self,
                                                                         f"task {self.task!r}")),
            (self.fusion_stage in (refused := getattr(fusion_class(self.fusion), "refused_stages", {})),
             f"model.fusion={self.fusion} with model.fusion_stage={self.fusion_stage}: "
             f"{refused.get(self.fusion_stage)}"),
            *((self.fusion_stage == "early" and getattr(self, k), f"model.{k}={getattr(self, k)!r} "
               "with model.fusion_stage=early: early fusion replaces the encoders by input "
               "embeddings, so the pretrained weights would be unused; use stage mid or late")
              for k in ("text_pretrained", "image_pretrained", "audio_pretrained")),
            (self.image_pretrained and torchvision_file(self.image_pretrained)
             and self.image_encoder == "cnn", f"model.image_pretrained="
             f"{self.image_pretrained!r}: a file of torchvision weights; set model.image_encoder "
             "to resnet18, resnet50 or vit_b_16 (or give a Hugging Face model directory)"),
            *self._pretrained_problems()])

    def _pretrained_problems(self) -> list[tuple[bool, str]]:
        mods, task = self.modalities, task_class(self.task)
        decodes = task.uses_decoder(self)
        return [
            (self.decoder_pretrained and not decodes, f"model.decoder_pretrained="
             f"{self.decoder_pretrained!r}: task {self.task!r} has no decoder LM (use lm, "
             "prompted, vqa or multitask)"),
            (self.decoder_pretrained and self.lm_conditioning != "prefix",
             f"model.decoder_pretrained with model.lm_conditioning={self.lm_conditioning}: a "
             "pretrained causal LM reads the fused tokens as a prefix; use prefix"),
            *((m not in mods or n < 1, f"model.modality_tokens.{m}={n}: needs a modality of "
               f"model.modalities={mods} and >= 1 token") for m, n in self.modality_tokens.items()),
            *part_problems(self, decodes)]


class TrainConfig(Section):
    """Ray Train scaling and the DeepSpeed engine; the one source of lr, batch and precision."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: int = Field(2, ge=0, le=3)
    zero_on_one_worker: bool = Field(False, description=(
        "run ZeRO-1/2 even on one worker, where nothing is partitioned and its gradient hooks "
        "and bucket copies only cost time (false: one worker runs them as ZeRO-0)"))
    offload_optimizer: bool = False
    precision: Literal[PRECISIONS] = "fp32"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    micro_batch_size: int = Field(32, ge=1)  # per worker, per forward pass
    global_batch_size: int = Field(0, ge=0)  # 0 -> micro_batch_size * num_workers (no accum.)
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    max_steps: int = Field(0, ge=0)  # optimizer steps; 0 -> run `epochs` epochs
    epochs: int = Field(3, ge=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # optimizer steps between evaluations; 0 -> once per epoch
    log_every: int = Field(10, ge=1)  # optimizer steps between train-loss lines and MLflow points
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints; 0 -> once per epoch
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)  # attempts resumed from the newest checkpoint (train.retry)
    max_bad_steps: int = Field(5, ge=1)  # consecutive NaN/Inf losses before the run stops
    storage_path: str | None = None  # Ray Train storage (checkpoints); None -> ./runs
    run_name: str | None = None  # the same name continues the same run and MLflow run

    @property
    def world_size(self) -> int:  # one rank per Ray Train worker
        return self.num_workers

    def zero_stage_at(self, world_size: int | None = None) -> int:
        """The ZeRO stage DeepSpeed runs at ``world_size`` (default: num_workers): stages 1
        and 2 partition optimizer state and gradients across ranks, so one rank runs them as
        ZeRO-0 (same numerics, none of the hooks) unless zero_on_one_worker or optimizer
        offload (which needs ZeRO) asks for them."""
        world = world_size or self.world_size
        if (world == 1 and self.zero_stage in (1, 2) and not self.zero_on_one_worker
                and not self.offload_optimizer):
            return 0
        return self.zero_stage

    @property
    def train_batch_size(self) -> int:  # samples per optimizer step, all ranks (as in DeepSpeed)
        return self.global_batch_size or self.micro_batch_size * self.world_size

    @property
    def grad_accum_steps(self) -> int:  # micro batches per rank per optimizer step
        return self.train_batch_size // (self.micro_batch_size * self.world_size)

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        return report(self, info, [
            (self.offload_optimizer and self.zero_stage == 0,
             "train.offload_optimizer=true: needs train.zero_stage >= 1"),
            (self.max_steps == 0 and self.epochs == 0,
             "train.max_steps=0 and train.epochs=0: set one of them"),
            (self.global_batch_size % per_step, f"train.global_batch_size={self.global_batch_size}"
             f": must be a multiple of train.micro_batch_size*train.num_workers ({per_step})")])


class TuneConfig(Section):
    """Ray Tune sweep over any config keys."""

    num_samples: int = Field(1, ge=1)  # samples of the space (each grid point this often)
    max_concurrent_trials: int = Field(2, ge=1)
    scheduler: Literal[SCHEDULERS] = "asha"
    search: Literal[SEARCH_ALGS] = "grid"
    metric: str | None = Field(None, pattern="^val_")  # validation metric; None -> the task's
    grace_period: int = Field(1, ge=1)  # ASHA: evaluations before a trial may be stopped
    reduction_factor: int = Field(2, ge=2)
    space: dict[str, Any] = Field(default_factory=dict)  # key: [..] or {loguniform: [lo, hi]}


# `register` is also ABCMeta.register on the class; an instance holds the field (the bool).
warnings.filterwarnings("ignore", 'Field name "register" in "TrackingConfig" shadows')


class TrackingConfig(Section):
    """MLflow: where runs go and what the model is registered as."""

    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI or a local sqlite store
    experiment: str = Field("mmdist", min_length=1)
    model_name: str = Field("mmdist-model", min_length=1)
    register: bool = True


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> Config:
        d, m = self.data, self.model
        encodes = bool({"image", "video"} & set(m.modalities)) and m.fusion_stage != "early"
        return report(self, info, [
            (encodes and m.image_encoder == "vit_b_16" and d.image_size % 16,
             f"data.image_size={d.image_size}: model.image_encoder=vit_b_16 needs a multiple of "
             "16 (its patch size)"),
            (encodes and m.image_encoder in ("resnet18", "resnet50") and d.image_size < 32,
             f"data.image_size={d.image_size}: model.image_encoder={m.image_encoder} "
             "downsamples 32x; use at least 32"),
            *((True, p) for p in space_problems(Config, self.to_dict()))])

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer shards are prepared with: ``data.tokenizer``, else a pretrained LM's own
        (``model.decoder_pretrained``), else None (one is trained on the train text)."""
        return self.data.tokenizer or self.model.decoder_pretrained

    @property
    def primary_metric(self) -> str:
        """What trials and checkpoints are judged by: ``tune.metric`` or the task's metric."""
        return self.tune.metric or task_class(self.model.task).primary_metric

    @property
    def metric_mode(self) -> Literal["min", "max"]:
        if not self.tune.metric:
            return task_class(self.model.task).mode
        return "min" if self.tune.metric.endswith(LOWER_IS_BETTER) else "max"

    def resolve(self) -> dict[str, Any]:
        """The derived values (properties of the config), logged beside it as MLflow params."""
        t = self.train
        return {"world_size": t.world_size, "zero_stage": t.zero_stage_at(),
                "global_batch_size": t.train_batch_size,
                "grad_accum_steps": t.grad_accum_steps, "primary_metric": self.primary_metric,
                "metric_mode": self.metric_mode}

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-safe nested dict."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str | None = None) -> Config:
        """Build and validate; every problem is raised at once as a :class:`ConfigError`."""
        return apply_overrides(d or {}, {}, source)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (`train.lr` -> 0.001), for MLflow params and Tune."""
        return flatten(self.to_dict())

    def override(self, overrides: list[str] | dict[str, Any]) -> Config:
        """A new config with dotted overrides applied (strings ``key=value`` or a dict)."""
        return apply_overrides(self.to_dict(), overrides)


def apply_overrides(base: dict[str, Any], overrides: list[str] | dict[str, Any],
                    source: str | None = None) -> Config:
    """Nested dict ``base`` with ``["model.fusion=add"]`` or ``{"model.fusion": "add"}`` applied."""
    cfg, problems = build(Config, base, overrides)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | None = "demo", overrides: list[str] | dict | None = None) -> Config:
    """Load a preset (by name) or a YAML file (by path), then apply overrides.

    Raises:
        ConfigError: every problem with the file and overrides, each naming its key.
        FileNotFoundError: neither a preset nor a file of that name exists.
    """
    path, raw, problems = read_yaml(name_or_path or "demo", CONFIG_DIR)
    if problems:
        raise ConfigError(problems, str(path))
    return apply_overrides(raw, overrides or [], source=str(path))
