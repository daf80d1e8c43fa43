"""One typed config tree for mmdist: data, model, train, tune, tracking.

Load a preset shipped in ``mmdist/configs/`` or any YAML file, apply dotted ``key=value``
overrides, validate everything at once and get a :class:`Config` that turns into a plain dict
(for Ray workers, Tune and MLflow params) and back without loss.

    cfg = load_config("demo", ["model.fusion=attention", "train.lr=3e-4"])
    cfg.model.fusion            # 'attention'
    Config.from_dict(cfg.to_dict()) == cfg   # True

Every problem (unknown key, wrong type, invalid value) is collected and raised once as a
:class:`ConfigError` that names each key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"

# Choices: one place, read by validation, the CLI help and the sweep defaults.
TASKS = ("itm", "contrastive", "classify", "lm", "vqa", "multitask")
SIZES = ("tiny", "small", "base", "1b", "7b")
MODALITIES = ("text", "image", "audio")
FUSIONS = ("concat", "add", "mul", "weighted", "attention", "transformer", "conv", "recurrent")
FUSION_STAGES = ("early", "mid", "late")
TEXT_ENCODERS = ("bert", "lstm", "gru")
IMAGE_ENCODERS = ("cnn", "resnet18", "resnet50", "vit_b_16")
AUDIO_ENCODERS = ("conv", "transformer")
DECODERS = ("gpt2", "llama", "lstm")
LM_CONDITIONING = ("prefix", "cross_attention")
VQA_ANSWERS = ("generate", "classify")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("asha", "fifo")
SEARCH_ALGS = ("random", "grid")

# The metric each task is judged by (higher is better unless listed in LOWER_IS_BETTER).
PRIMARY_METRIC = {
    "itm": "val_accuracy",
    "contrastive": "val_r1_mean",
    "classify": "val_accuracy",
    "lm": "val_loss",
    "vqa": "val_accuracy",
    "multitask": "val_loss",
}
LOWER_IS_BETTER = {"val_loss", "val_perplexity"}


class ConfigError(ValueError):
    """A config with one or more problems; ``problems`` lists each as ``key: message``."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        head = f"invalid config{f' ({source})' if source else ''}: {len(problems)} problem(s)"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))
        self.source = source

    def __reduce__(self):  # rebuilt from its problems after crossing a process (Ray)
        return (type(self), (self.problems, self.source))


@dataclass
class DataConfig:
    """Where the shards are and how rows become tensors."""

    path: str | None = None  # shard directory written by `mmdist prepare`; None -> synthetic
    synthetic_samples: int = 2000  # rows generated when path is None
    val_fraction: float = 0.1
    image_size: int = 64  # square side after resize/crop, pixels
    sample_rate: int = 16000  # audio is resampled to this rate, Hz
    audio_seconds: float = 1.0  # clips are cut or padded to this length
    n_mels: int = 32  # log-mel bins
    hop_length: int = 160  # samples between spectrogram frames
    max_text_len: int = 32  # tokens, including special tokens
    vocab_size: int = 2000  # size of a tokenizer trained locally on the training text
    tokenizer: str | None = None  # local pretrained tokenizer directory instead of training one
    augment: bool = False  # random crop/flip of images in training
    shard_rows: int = 1000  # target rows per Parquet shard
    cpus_per_task: float = 0.5  # CPUs each Ray Data read+preprocess task reserves; a fraction
    # lets data tasks run beside training workers that hold whole CPUs
    deterministic: bool = True  # same seed -> same sample order on every rank (Ray Data
    # preserve_order on train); false lets blocks arrive as they finish (less waiting)


@dataclass
class ModelConfig:
    """The fused model: encoders, fusion method and stage, task head."""

    task: str = "itm"
    size: str = "small"
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    fusion: str = "concat"
    fusion_stage: str = "mid"
    text_encoder: str = "lstm"
    image_encoder: str = "cnn"
    audio_encoder: str = "conv"
    decoder: str = "gpt2"  # the decoder LM for task lm/vqa/multitask
    lm_conditioning: str = "prefix"
    vqa_answer: str = "generate"  # vqa: generate the answer with the decoder, or classify it
    hidden_size: int = 0  # 0 -> the width of `size`
    num_classes: int = 8  # classify / multitask classification head
    modality_dropout: float = 0.0  # probability of dropping a non-text modality per sample
    task_weights: dict[str, float] = field(default_factory=dict)  # multitask loss weights
    text_pretrained: str | None = None  # local transformers directory for the bert encoder
    image_pretrained: str | None = None  # local safetensors file for the torchvision encoder
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model


@dataclass
class TrainConfig:
    """Ray Train scaling and the DeepSpeed engine; the one source of lr, batch and precision."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    precision: str = "fp32"
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    micro_batch_size: int = 32  # per worker, per forward pass
    global_batch_size: int = 0  # 0 -> micro_batch_size * num_workers (no accumulation)
    grad_clip: float = 1.0
    max_steps: int = 0  # optimizer steps; 0 -> run `epochs` epochs
    epochs: int = 3
    seed: int = 0
    eval_every: int = 0  # optimizer steps between evaluations; 0 -> once per epoch
    log_every: int = 10  # optimizer steps between train-loss lines and MLflow points
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 -> once per epoch
    keep_checkpoints: int = 2
    max_failures: int = 2  # failed attempts resumed from the newest checkpoint; an error before
    # the first checkpoint, or the same error again from the same checkpoint, is not retried
    max_bad_steps: int = 5  # consecutive NaN/Inf losses before the run stops
    storage_path: str | None = None  # Ray Train storage (checkpoints); None -> ./runs
    run_name: str | None = None  # the same name continues the same run and MLflow run


@dataclass
class TuneConfig:
    """Ray Tune sweep over any config keys."""

    num_samples: int = 1  # samples of the space (each grid point is repeated this often)
    max_concurrent_trials: int = 2
    scheduler: str = "asha"
    search: str = "grid"
    metric: str | None = None  # None -> the task's primary metric
    grace_period: int = 1  # ASHA: evaluations before a trial may be stopped
    reduction_factor: int = 2
    space: dict[str, Any] = field(default_factory=dict)  # "model.fusion": [..] or {loguniform: [a, b]}


@dataclass
class TrackingConfig:
    """MLflow: where runs go and what the model is registered as."""

    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI or a local sqlite store
    experiment: str = "mmdist"
    model_name: str = "mmdist-model"
    register: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-safe nested dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> Config:
        """Build and validate; every problem is reported at once."""
        problems: list[str] = []
        # Fields with a type problem keep their default, so validation of the others still
        # runs and every problem is reported in one go.
        cfg = _build(cls, d or {}, "", problems)
        problems.extend(validate(cfg))
        if problems:
            raise ConfigError(problems, source)
        return cfg

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (`train.lr` -> 0.001), for MLflow params and Tune."""
        return flatten(self.to_dict())

    def override(self, overrides: list[str] | dict[str, Any]) -> Config:
        """A new config with dotted overrides applied (strings ``key=value`` or a dict)."""
        return apply_overrides(self.to_dict(), overrides)

    # ---- derived values, all in one place -----------------------------------------------
    def resolve(self) -> dict[str, Any]:
        """Values derived from the config; logged beside it as MLflow params."""
        t = self.train
        world = t.num_workers
        global_batch = t.global_batch_size or t.micro_batch_size * world
        metric = self.tune.metric or PRIMARY_METRIC[self.model.task]
        return {
            "world_size": world,
            "global_batch_size": global_batch,
            "grad_accum_steps": global_batch // (t.micro_batch_size * world),
            "primary_metric": metric,
            "metric_mode": "min" if metric in LOWER_IS_BETTER else "max",
        }


# ---- building from dicts ----------------------------------------------------------------


def _build(cls: type, d: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(d, dict):
        problems.append(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {d!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown key; known keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, d[f.name], key + ".", problems)
        else:
            ok, value = _coerce(d[f.name], tp)
            if ok:
                kwargs[f.name] = value
            else:
                problems.append(f"{key}={d[f.name]!r}: expected {_type_name(tp)}")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check/convert one value against a type hint. Strings from the CLI are parsed as YAML."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return (True, None) if type(None) in args else (False, None)
        for arg in args:
            if arg is type(None):
                continue
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, None
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return False, None
    if tp is bool:
        return (True, value) if isinstance(value, bool) else (False, None)
    if tp is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return False, None
    if tp is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        return (True, value) if isinstance(value, str) else (False, None)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return False, None
        out = []
        for v in value:
            ok, c = _coerce(v, item_tp)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return False, None
        out = {}
        for k, v in value.items():
            if val_tp is Any and isinstance(v, str):
                try:
                    v = yaml.safe_load(v)
                except yaml.YAMLError:
                    return False, None
            ok, c = _coerce(v, val_tp) if val_tp is not Any else (True, v)
            if not ok or not isinstance(k, str):
                return False, None
            out[k] = c
        return True, out
    if tp is Any:
        return True, value
    return False, None


# ---- validation: every rule, every problem ------------------------------------------------


def _choice(problems: list[str], key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r}: choose from {list(choices)}")


def validate(cfg: Config) -> list[str]:
    """All problems with a typed config, each naming its key; empty when valid."""
    p: list[str] = []
    d, m, t, tu = cfg.data, cfg.model, cfg.train, cfg.tune

    # data
    if not 0.0 <= d.val_fraction < 1.0:
        p.append(f"data.val_fraction={d.val_fraction}: must be in [0, 1)")
    for key in ("synthetic_samples", "image_size", "sample_rate", "n_mels", "hop_length",
                "max_text_len", "vocab_size", "shard_rows"):
        if getattr(d, key) < 1:
            p.append(f"data.{key}={getattr(d, key)}: must be >= 1")
    if not d.cpus_per_task > 0:
        p.append(f"data.cpus_per_task={d.cpus_per_task}: must be > 0")
    if d.audio_seconds <= 0:
        p.append(f"data.audio_seconds={d.audio_seconds}: must be > 0")
    if d.max_text_len < 4:
        p.append(f"data.max_text_len={d.max_text_len}: must be >= 4 (special tokens need room)")

    # model
    _choice(p, "model.task", m.task, TASKS)
    _choice(p, "model.size", m.size, SIZES)
    _choice(p, "model.fusion", m.fusion, FUSIONS)
    _choice(p, "model.fusion_stage", m.fusion_stage, FUSION_STAGES)
    _choice(p, "model.text_encoder", m.text_encoder, TEXT_ENCODERS)
    _choice(p, "model.image_encoder", m.image_encoder, IMAGE_ENCODERS)
    _choice(p, "model.audio_encoder", m.audio_encoder, AUDIO_ENCODERS)
    _choice(p, "model.decoder", m.decoder, DECODERS)
    _choice(p, "model.lm_conditioning", m.lm_conditioning, LM_CONDITIONING)
    _choice(p, "model.vqa_answer", m.vqa_answer, VQA_ANSWERS)
    bad_mods = [x for x in m.modalities if x not in MODALITIES]
    if bad_mods:
        p.append(f"model.modalities={m.modalities}: unknown {bad_mods}; choose from {list(MODALITIES)}")
    if len(set(m.modalities)) != len(m.modalities):
        p.append(f"model.modalities={m.modalities}: listed twice")
    if not m.modalities:
        p.append("model.modalities=[]: needs at least one modality")
    if m.task in ("itm", "contrastive", "lm", "vqa") and "text" not in m.modalities:
        p.append(f"model.modalities={m.modalities}: task {m.task!r} needs 'text'")
    if m.task in ("itm", "contrastive") and len(m.modalities) < 2:
        p.append(f"model.modalities={m.modalities}: task {m.task!r} matches text against "
                 "another modality; add 'image' or 'audio'")
    if m.hidden_size < 0:
        p.append(f"model.hidden_size={m.hidden_size}: must be >= 0 (0 = from model.size)")
    if m.num_classes < 2 and m.task in ("classify", "multitask"):
        p.append(f"model.num_classes={m.num_classes}: must be >= 2 for task {m.task!r}")
    if not 0.0 <= m.modality_dropout < 1.0:
        p.append(f"model.modality_dropout={m.modality_dropout}: must be in [0, 1)")
    for k, w in m.task_weights.items():
        if k not in TASKS or k == "multitask":
            p.append(f"model.task_weights.{k}: unknown task; choose from {list(TASKS[:-1])}")
        elif w < 0:
            p.append(f"model.task_weights.{k}={w}: must be >= 0")
    # Stage x method: `late` fuses one pooled vector per modality, so methods that mix
    # token sequences (cross-attention) have nothing to attend over.
    if m.fusion_stage == "late" and m.fusion == "attention":
        p.append("model.fusion=attention with model.fusion_stage=late: late fusion combines one "
                 "pooled output per modality, so cross-attention has no token sequence to attend "
                 "over; use stage early/mid or fusion transformer/weighted/concat")

    if m.decoder == "llama" and m.lm_conditioning == "cross_attention" and (
            m.task in ("lm", "multitask") or (m.task == "vqa" and m.vqa_answer == "generate")):
        p.append("model.decoder=llama with model.lm_conditioning=cross_attention: transformers' "
                 "Llama has no cross-attention layers; use model.lm_conditioning=prefix or "
                 "model.decoder=gpt2/lstm")
    if m.fusion_stage == "early":
        # Early fusion replaces the encoders by light input embeddings; pretrained encoder
        # weights would be silently unused.
        for key in ("text_pretrained", "image_pretrained"):
            if getattr(m, key):
                p.append(f"model.{key}={getattr(m, key)!r} with model.fusion_stage=early: early "
                         "fusion replaces the encoders by input embeddings, so the pretrained "
                         "weights would be unused; use stage mid or late")
    if m.text_pretrained and m.text_encoder != "bert":
        p.append(f"model.text_pretrained={m.text_pretrained!r}: loads a transformers BERT; set "
                 "model.text_encoder=bert")
    if m.image_pretrained and m.image_encoder == "cnn":
        p.append(f"model.image_pretrained={m.image_pretrained!r}: loads torchvision weights; set "
                 "model.image_encoder to resnet18, resnet50 or vit_b_16")
    if m.image_encoder == "vit_b_16" and "image" in m.modalities and m.fusion_stage != "early" \
            and d.image_size % 16:
        p.append(f"data.image_size={d.image_size}: model.image_encoder=vit_b_16 needs a multiple "
                 "of 16 (its patch size)")
    if m.image_encoder in ("resnet18", "resnet50") and "image" in m.modalities \
            and m.fusion_stage != "early" and d.image_size < 32:
        p.append(f"data.image_size={d.image_size}: model.image_encoder={m.image_encoder} "
                 "downsamples 32x; use at least 32")
    if m.task == "multitask":
        if "vqa" in m.task_weights:
            p.append("model.task_weights.vqa: multitask combines itm, contrastive, classify and "
                     "lm (vqa answer generation is lm on question+answer data)")
        if m.task_weights and not any(w > 0 for w in m.task_weights.values()):
            p.append(f"model.task_weights={m.task_weights}: multitask needs a task with weight > 0")
        needs_pair = [k for k in ("itm", "contrastive") if m.task_weights.get(k, 0) > 0]
        if needs_pair and ("text" not in m.modalities or len(m.modalities) < 2):
            p.append(f"model.modalities={m.modalities}: multitask {needs_pair} matches text "
                     "against another modality; needs 'text' and 'image' or 'audio'")
        if m.task_weights.get("lm", 0) > 0 and "text" not in m.modalities:
            p.append(f"model.modalities={m.modalities}: multitask lm needs 'text'")

    # train
    if t.num_workers < 1:
        p.append(f"train.num_workers={t.num_workers}: must be >= 1")
    if t.cpus_per_worker <= 0:
        p.append(f"train.cpus_per_worker={t.cpus_per_worker}: must be > 0")
    if t.zero_stage not in (0, 1, 2, 3):
        p.append(f"train.zero_stage={t.zero_stage}: choose from [0, 1, 2, 3]")
    _choice(p, "train.precision", t.precision, PRECISIONS)
    if t.offload_optimizer and t.zero_stage == 0:
        p.append("train.offload_optimizer=true: needs train.zero_stage >= 1")
    if not t.lr > 0:
        p.append(f"train.lr={t.lr}: must be > 0")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay={t.weight_decay}: must be >= 0")
    for key in ("micro_batch_size", "keep_checkpoints", "max_bad_steps", "log_every"):
        if getattr(t, key) < 1:
            p.append(f"train.{key}={getattr(t, key)}: must be >= 1")
    for key in ("warmup_steps", "global_batch_size", "max_steps", "epochs", "eval_every",
                "checkpoint_every", "max_failures"):
        if getattr(t, key) < 0:
            p.append(f"train.{key}={getattr(t, key)}: must be >= 0")
    if t.max_steps == 0 and t.epochs == 0:
        p.append("train.max_steps=0 and train.epochs=0: set one of them")
    if t.global_batch_size and t.micro_batch_size >= 1 and t.num_workers >= 1:
        per_step = t.micro_batch_size * t.num_workers
        if t.global_batch_size % per_step:
            p.append(f"train.global_batch_size={t.global_batch_size}: must be a multiple of "
                     f"train.micro_batch_size*train.num_workers ({per_step})")
    if t.grad_clip < 0:
        p.append(f"train.grad_clip={t.grad_clip}: must be >= 0 (0 = off)")

    # tune
    if tu.num_samples < 1:
        p.append(f"tune.num_samples={tu.num_samples}: must be >= 1")
    if tu.max_concurrent_trials < 1:
        p.append(f"tune.max_concurrent_trials={tu.max_concurrent_trials}: must be >= 1")
    _choice(p, "tune.scheduler", tu.scheduler, SCHEDULERS)
    _choice(p, "tune.search", tu.search, SEARCH_ALGS)
    if tu.grace_period < 1:
        p.append(f"tune.grace_period={tu.grace_period}: must be >= 1")
    if tu.reduction_factor < 2:
        p.append(f"tune.reduction_factor={tu.reduction_factor}: must be >= 2")
    flat_keys = set(flatten(Config().to_dict()))
    for key, spec in tu.space.items():
        if key not in flat_keys:
            p.append(f"tune.space.{key}: not a config key")
            continue
        if isinstance(spec, dict):
            kinds = set(spec) & {"loguniform", "uniform", "choice"}
            if len(kinds) != 1 or len(spec) != 1:
                p.append(f"tune.space.{key}={spec!r}: use a list of choices or one of "
                         "{loguniform: [lo, hi]}, {uniform: [lo, hi]}, {choice: [...]}")
        elif not isinstance(spec, list) or not spec:
            p.append(f"tune.space.{key}={spec!r}: expected a non-empty list of choices")
        else:
            base = cfg.to_dict()
            base["tune"]["space"] = {}
            for v in spec:  # each choice must itself be a valid value of that key
                try:
                    apply_overrides(base, {key: v})
                except ConfigError as e:
                    p.extend(f"tune.space.{key}: choice {v!r} is invalid: {x}"
                             for x in e.problems if x.startswith(key))
    if tu.metric is not None and not tu.metric.startswith("val_"):
        p.append(f"tune.metric={tu.metric!r}: must be a validation metric (val_*)")

    # tracking
    if not cfg.tracking.experiment:
        p.append("tracking.experiment: must not be empty")
    if not cfg.tracking.model_name:
        p.append("tracking.model_name: must not be empty")
    return p


# ---- dotted keys -------------------------------------------------------------------------


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        # Only the five sections nest; dict-valued fields (task_weights, space) stay whole.
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(items: list[str] | dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``["a.b=1"]`` -> ``{"a.b": "1"}``; problems for items without ``=``."""
    if isinstance(items, dict):
        return dict(items), []
    out, problems = {}, []
    for item in items:
        if "=" not in item:
            problems.append(f"{item!r}: overrides look like key=value (e.g. model.fusion=attention)")
            continue
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out, problems


def apply_overrides(base: dict[str, Any], overrides: list[str] | dict[str, Any],
                    source: str | None = None) -> Config:
    """Apply dotted overrides to a nested dict and build a validated Config."""
    parsed, problems = parse_overrides(overrides)
    merged = _deepcopy(base)
    sections = {f.name for f in dataclasses.fields(Config)}
    for key, value in parsed.items():
        parts = key.split(".")
        if parts[0] not in sections:
            problems.append(f"{key}: unknown section {parts[0]!r}; choose from {sorted(sections)}")
            continue
        if len(parts) < 2:
            problems.append(f"{key}: name a key inside the section, e.g. {key}.<name>=...")
            continue
        section = merged.setdefault(parts[0], {})
        if len(parts) == 2:
            section[parts[1]] = value
        else:  # a dict-valued field: the rest is one key (tune.space.model.fusion=...)
            sub = section.get(parts[1])
            if not isinstance(sub, dict):
                sub = section[parts[1]] = {}
            sub[".".join(parts[2:])] = value
    try:
        cfg = Config.from_dict(merged, source)
    except ConfigError as e:
        raise ConfigError(problems + e.problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# ---- presets and files ---------------------------------------------------------------------


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | None = "demo", overrides: list[str] | dict | None = None) -> Config:
    """Load a preset (by name) or a YAML file (by path), then apply overrides.

    Raises:
        ConfigError: every problem with the file and overrides, each naming its key.
        FileNotFoundError: neither a preset nor a file of that name exists.
    """
    name_or_path = name_or_path or "demo"
    path = Path(name_or_path)
    if not path.suffix and (CONFIG_DIR / f"{name_or_path}.yaml").exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(
            f"config {name_or_path!r}: no such file and no such preset; presets: {list_presets()}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections"], str(path))
    return apply_overrides(raw, overrides or [], source=str(path))
