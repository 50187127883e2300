"""The structured config: every key a user can set, its type and default.

Hydra composes `conf/config.yaml` on top of these dataclasses, so an unknown key
or a value of the wrong type is rejected before anything runs. `check()` adds the
rules a type cannot express (choices, ranges, combinations). Only this module and
`cli.py` know about Hydra; everything else receives a plain `Config` object.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class JobConfig:
    """Which task to train. `target` is `module:Class`; any importable path works."""
    name: str = MISSING
    target: str = MISSING
    batch_size: int = 64  # the job's default micro-batch (used by batch.size=auto on CPU)


@dataclass
class Mnist1dJob(JobConfig):
    name: str = "mnist1d"
    target: str = "jobs.mnist1d:Mnist1D"
    batch_size: int = 64
    model: str = "cnn"  # mlp | cnn (the two models of the MNIST-1D paper)
    hidden: int = 100
    channels: int = 25
    samples: int = 5000  # train + test, 80/20 split as in the paper
    data_seed: int = 42


@dataclass
class SyntheticJob(JobConfig):
    name: str = "synthetic"
    target: str = "jobs.synthetic:Synthetic"
    batch_size: int = 32
    model: str = "resnet"  # resnet | vit
    width: int = 64  # resnet: stem channels (64 = ResNet-50 widths); vit: ignored
    depth: List[int] = field(default_factory=lambda: [3, 4, 6, 3])  # resnet stages
    dim: int = 768  # vit
    layers: int = 12  # vit
    heads: int = 12  # vit
    patch: int = 16  # vit
    image_size: int = 224
    num_classes: int = 1000
    train_samples: int = 4096
    val_samples: int = 1024


@dataclass
class CustomJob(JobConfig):
    """A user's own job: `job=custom job.target=my_pkg.my_job:MyJob +job.params.k=v`."""
    name: str = "custom"
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    dir: Optional[str] = None  # default: <root>/<id>
    root: str = "runs"
    id: Optional[str] = None  # default: SLURM_JOB_ID, TORCHELASTIC_RUN_ID, timestamp
    resume: str = "auto"  # auto | never | must
    seed: int = 0
    # Signals that stop training cleanly at the next step (checkpoint, exit 128+signum); see launcher/signals.py.
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])


@dataclass
class TrainConfig:
    epochs: int = 60
    max_steps: int = 0  # optimizer steps; 0 = epochs decide
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    grad_clip: float = 0.0  # max grad norm; 0 = off
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the forward (DDP-aware: compiles the DDP wrapper in place)
    channels_last: bool = False  # NHWC weights and inputs for conv nets (faster convolutions on tensor cores)


@dataclass
class DataConfig:
    workers: int = 0
    pin_memory: bool = True  # only where a GPU is used
    persistent_workers: bool = True  # keep loader workers alive across epochs (with workers > 0)
    prefetch: int = 2  # batches each worker loads ahead (with workers > 0)


@dataclass
class DdpConfig:
    """DistributedDataParallel settings (used with 2+ training ranks)."""
    bucket_cap_mb: float = 25.0  # gradient bucket size; larger = fewer, bigger all-reduces
    gradient_as_bucket_view: bool = True  # grads are views into the buckets: no copy, less memory
    static_graph: bool = False  # same graph every step: lets DDP skip its per-step bookkeeping


@dataclass
class BatchConfig:
    size: Any = 64  # per-rank micro-batch: an int or "auto"
    global_size: Optional[int] = None  # fixed effective batch; accumulation fills the rest


@dataclass
class AutobatchConfig:
    fraction: float = 0.9  # of device memory the chosen batch may peak at (the margin where memory is measured)
    margin: float = 0.05  # where memory is not measured (simulated limits): this much below the largest that ran;
    #                       also the search's resolution (it stops when fit and failure are margin/2 apart)
    max: int = 4096  # largest micro-batch tried
    max_probes: int = 10  # trial steps per rank at most
    max_retries: int = 3  # runtime OOM recoveries before giving up; 0 = off (then DDP syncs inside backward)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.01  # never applied to biases or norm weights
    momentum: float = 0.9  # sgd momentum / adamw beta1
    beta2: float = 0.999
    nesterov: bool = False
    eps: float = 1e-8
    fused: Optional[bool] = None  # None = fused where torch supports it (CUDA)


@dataclass
class SchedConfig:
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # used when warmup_steps is 0
    min_lr: float = 0.0  # cosine floor, as a fraction of optim.lr
    warmup_momentum: Optional[float] = None  # YOLO-style: momentum rises from this
    warmup_bias_lr: Optional[float] = None  # YOLO-style: bias lr falls from this


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999
    ramp: str = "exp"  # exp | tf | none
    tau: Optional[float] = None  # exp ramp time constant in updates; null = auto: spans ~5% of the run at its end
    every: int = 1  # update every k optimizer steps


@dataclass
class ValidationConfig:
    mode: str = "auto"  # auto | rank | process | inline | off | external (hand-off only; `launcher validate` elsewhere)
    rank: int = -1  # which global rank validates with mode=rank
    every_steps: int = 0  # 0 = use every_epochs
    every_epochs: int = 1
    weights: str = "ema"  # ema | raw | both
    policy: str = "latest"  # latest | all
    batch_size: Any = 1000  # an int or "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    metric: str = "acc"
    goal: str = "max"  # max | min
    queue: int = 2  # most unclaimed snapshots kept with policy=latest
    drain_timeout_s: float = 300.0
    device: str = "auto"  # the validator's device: auto | cpu | cuda | cuda:<n>


@dataclass
class EarlyStopConfig:
    patience: int = 0  # validations without improvement; 0 = off
    min_delta: float = 0.0
    window: int = 1  # sliding average over this many validations


@dataclass
class CheckpointConfig:
    every_steps: int = 200  # and always at the end; 0 = only at the end
    keep_last: int = 3


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "launcher"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TelemetryConfig:
    every_s: float = 10.0  # NVML sampling period; 0 = off


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: str = "auto"  # auto | rich | plain | off
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


@dataclass
class DebugConfig:
    """Real fault injection for tests and demos; all off by default."""
    simulate_oom_above: Any = None  # int, or a list with one limit per rank
    simulate_oom_at_step: Optional[int] = None  # one OOM in backward of this step (from 1), last training rank
    fail_at_step: Optional[int] = None  # os._exit at this step, once per run
    step_delay_s: float = 0.0  # sleep after each step: a short run stays alive long enough to signal it
    val_delay_s: float = 0.0


@dataclass
class Config:
    job: Any = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    autobatch: AutobatchConfig = field(default_factory=AutobatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="job", name="mnist1d_schema", node=Mnist1dJob)
    cs.store(group="job", name="synthetic_schema", node=SyntheticJob)
    cs.store(group="job", name="custom_schema", node=CustomJob)
    from jobs.images import ImagesJob  # the images job keeps its schema beside it

    cs.store(group="job", name="images_schema", node=ImagesJob)


class ConfigError(ValueError):
    """Bad input: the CLI prints it as one line and exits with status 2."""


CHOICES = {
    "run.resume": ("auto", "never", "must"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "optim.name": ("adamw", "sgd"),
    "ema.ramp": ("exp", "tf", "none"),
    "validation.mode": ("auto", "rank", "process", "inline", "off", "external"),
    "validation.weights": ("ema", "raw", "both"),
    "validation.policy": ("latest", "all"),
    "validation.precision": ("auto", "fp32", "bf16", "fp16"),
    "validation.goal": ("max", "min"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "logger.progress": ("auto", "rich", "plain", "off"),
}

POSITIVE = ("train.log_every", "ema.every", "data.prefetch", "ddp.bucket_cap_mb", "checkpoint.keep_last",
            "validation.queue", "early_stop.window", "autobatch.max", "autobatch.max_probes")
NON_NEGATIVE = ("validation.drain_timeout_s", "train.epochs", "train.max_steps", "train.grad_clip",
                "sched.warmup_steps",
                "sched.warmup_epochs", "checkpoint.every_steps", "validation.every_steps",
                "validation.every_epochs", "early_stop.patience", "debug.val_delay_s", "debug.step_delay_s",
                "autobatch.max_retries", "data.workers")


def get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _size_or_auto(key: str, value: Any) -> None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    raise ConfigError(f"{key}={value!r} is not valid; use a positive integer or 'auto'")


def check_device(key: str, value: str) -> None:
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ConfigError(f"{key}={value!r} is not valid; use auto, cpu, cuda or cuda:<index>")


def check(cfg: Config, world_size: int = 1) -> None:
    """Reject what the types cannot: bad choices, ranges, impossible combinations."""
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={get(cfg, key)!r} is not valid; choose one of {', '.join(allowed)}")
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            raise ConfigError(f"{key}={get(cfg, key)!r} is not valid; it must be > 0")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"{key}={get(cfg, key)!r} is not valid; it must be >= 0")
    _size_or_auto("batch.size", cfg.batch.size)
    _size_or_auto("validation.batch_size", cfg.validation.batch_size)
    check_device("validation.device", cfg.validation.device)
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise ConfigError("train.epochs=0 and train.max_steps=0: set at least one of them > 0")
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay={cfg.ema.decay} is not valid; it must be in (0, 1)")
    if cfg.ema.tau is not None and cfg.ema.tau <= 0:
        raise ConfigError(f"ema.tau={cfg.ema.tau} is not valid; it must be > 0")
    if not 0.0 < cfg.autobatch.fraction <= 1.0 or not 0.0 <= cfg.autobatch.margin < 1.0:
        raise ConfigError("autobatch.fraction must be in (0, 1] and autobatch.margin in [0, 1)")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} is not valid; it must be > 0")
    if cfg.batch.global_size is not None and cfg.batch.global_size <= 0:
        raise ConfigError(f"batch.global_size={cfg.batch.global_size} is not valid; it must be > 0")
    if cfg.validation.mode == "rank" and world_size < 2:
        raise ConfigError("validation.mode=rank needs at least 2 processes (torchrun --nproc_per_node>=2); "
                          "with one process use validation.mode=process, inline or off")
    if cfg.validation.mode in ("auto", "rank") and world_size >= 2:
        if not -world_size <= cfg.validation.rank < world_size:
            raise ConfigError(f"validation.rank={cfg.validation.rank} is not valid for {world_size} processes; "
                              f"use -{world_size}..{world_size - 1}")
    if cfg.validation.weights in ("ema", "both") and not cfg.ema.enabled and cfg.validation.mode != "off":
        raise ConfigError(f"validation.weights={cfg.validation.weights} needs ema.enabled=true; "
                          "use validation.weights=raw or enable the EMA")
    if cfg.ddp.static_graph and cfg.autobatch.max_retries > 0:
        raise ConfigError("ddp.static_graph=true needs autobatch.max_retries=0: OOM recovery averages gradients "
                          "itself, outside DDP's recorded graph; or keep ddp.static_graph=false")
    from launcher.signals import parse

    parse(cfg.run.stop_signals)
    oom = cfg.debug.simulate_oom_above
    if oom is not None:
        limits = list(oom) if isinstance(oom, (list, tuple)) or hasattr(oom, "__iter__") and not isinstance(oom, str) else [oom]
        if not limits or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in limits):
            raise ConfigError(f"debug.simulate_oom_above={oom!r} is not valid; use a positive int or a list of them")


def flat_defaults(node: Any = None, prefix: str = "") -> List[tuple]:
    """(key, type, default) for every leaf of the schema, for the README's config reference."""
    node = node if node is not None else Config
    rows = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            rows += flat_defaults(type(default), key + ".")
        else:
            rows.append((key, str(f.type), default))
    return rows
