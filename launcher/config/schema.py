"""The structured config: every key a user can set, its type and default.

Hydra composes `conf/config.yaml` on top of these dataclasses, so an unknown key
or a value of the wrong type is rejected before anything runs. `check()` adds the
rules a type cannot express (choices, ranges, combinations). Only this module and
`cli.py` know about Hydra; everything else receives a plain `Config` object.
Choices are Enums (str-valued, so they compare equal to their names): the schema
itself rejects a bad value, naming the valid ones. Each shipped job's own config
dataclass lives beside the job in jobs/.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from launcher.jobs.base import Choice, CustomJob
from launcher.jobs.images import ImagesJob
from launcher.jobs.mnist1d import Mnist1dJob
from launcher.jobs.synthetic import SyntheticJob


def _choice(name: str, *values: str) -> type:
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


Resume = _choice("Resume", "auto", "never", "must")
Precision = _choice("Precision", "auto", "fp32", "bf16", "fp16")
TrainDevice = _choice("TrainDevice", "auto", "cpu", "cuda")
Optimizer = _choice("Optimizer", "adamw", "sgd")
Ramp = _choice("Ramp", "exp", "tf", "none")
ValidationMode = _choice("ValidationMode", "auto", "rank", "process", "inline", "off", "external")
Weights = _choice("Weights", "ema", "raw", "both")
Policy = _choice("Policy", "latest", "all")
Goal = _choice("Goal", "max", "min")
WandbMode = _choice("WandbMode", "offline", "online", "disabled")
ProgressMode = _choice("ProgressMode", "auto", "rich", "plain", "off")
OomPhase = _choice("OomPhase", "forward", "backward", "last_backward", "headroom")
Strategy = _choice("Strategy", "ddp", "fsdp")


@dataclass
class RunConfig:
    dir: Optional[str] = None  # default: <root>/<id>
    root: str = "runs"
    id: Optional[str] = None  # default: SLURM_JOB_ID, TORCHELASTIC_RUN_ID, timestamp
    resume: Resume = Resume.auto
    seed: int = 0
    allow_changes: bool = False  # resume even with changes that break exactness (config_history.py: FROZEN)
    # Signals that stop training cleanly at the next step (checkpoint, exit 128+signum); see launcher/signals.py.
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])


@dataclass
class TrainConfig:
    epochs: int = 60
    max_steps: int = 0  # optimizer steps; 0 = epochs decide
    precision: Precision = Precision.auto
    grad_clip: float = 0.0  # max grad norm; 0 = off
    log_every: int = 10
    device: TrainDevice = TrainDevice.auto
    threads: int = 0  # CPU threads per training process; 0: OMP_NUM_THREADS, else cores split with the validator
    compile: bool = False  # torch.compile the forward (DDP-aware: compiles the DDP wrapper in place)
    channels_last: bool = False  # NHWC weights and inputs for conv nets (converted in the copy to the device)
    cudnn_benchmark: bool = True  # cuDNN times its conv algorithms once per input shape, keeps the fastest
    tf32: bool = True  # fp32 matmuls and convolutions on TF32 tensor cores (Ampere+; fp32 storage, ~10-bit mantissa)
    strategy: Strategy = Strategy.ddp  # ddp: replicated weights; fsdp: FSDP2 shards weights, grads, optimizer, EMA (fsdp.py)


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
class DistConfig:
    """Process groups."""
    timeout_s: float = 1800.0  # collective/rendezvous timeout of the process groups (tests shorten it)


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
    max_retries: int = 3  # runtime OOM recoveries (halvings) before giving up; 0 = off. See oom.py


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw
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
    ramp: Ramp = Ramp.exp
    tau: Optional[float] = None  # exp ramp time constant in updates; null = auto: spans ~5% of the run at its end
    every: int = 1  # update every k optimizer steps


@dataclass
class ValidationConfig:
    mode: ValidationMode = ValidationMode.auto  # external: hand-off only; `launcher validate` elsewhere
    rank: int = -1  # which global rank validates with mode=rank
    every_steps: int = 0  # 0 = use every_epochs
    every_epochs: int = 1
    weights: Weights = Weights.ema
    policy: Policy = Policy.latest
    batch_size: Any = 1000  # an int or "auto"
    precision: Precision = Precision.auto
    metric: str = "acc"
    goal: Goal = Goal.max
    queue: int = 2  # most unclaimed snapshots kept with policy=latest
    drain_timeout_s: float = 300.0
    device: str = "auto"  # the validator's device: auto | cpu | cuda | cuda:<n>
    share_gpu: bool = False  # mode=rank, one process more than GPUs on a node: the validator shares the last GPU
    workers: int = -1  # evaluation DataLoader processes, persistent; -1: data.workers, at least 2 on a GPU


@dataclass
class EarlyStopConfig:
    patience: int = 0  # validations without improvement; 0 = off
    min_delta: float = 0.0
    window: int = 1  # sliding average over this many validations


@dataclass
class CheckpointConfig:
    every_steps: int = 200  # and at every validation step and the end; 0 = only those
    keep_last: int = 3
    drain_timeout_s: float = 300.0  # the end, a stop or a restart waits this long for the save in flight


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
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
    progress: ProgressMode = ProgressMode.auto
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


@dataclass
class DebugConfig:
    """Real fault injection for tests and demos; all off by default."""
    simulate_oom_above: Any = None  # int, or a list with one limit per rank
    simulate_oom_at_step: Optional[int] = None  # one OOM in this step (from 1), on simulate_oom_rank, in simulate_oom_phase
    simulate_oom_phase: OomPhase = OomPhase.backward  # where: backward = the step's first; headroom = too little memory reported
    simulate_oom_rank: int = -1  # the training rank of debug.simulate_oom_at_step (-1: the last)
    nan_loss_at_step: Optional[int] = None  # the loss of this step (from 1) is NaN on training rank nan_loss_rank
    nan_loss_rank: int = -1  # the training rank that gets debug.nan_loss_at_step's NaN (-1: the last)
    handoff_oom_at_step: Optional[int] = None  # the hand-off of this step raises an OOM (skipped, recorded)
    fail_at_step: Optional[int] = None  # os._exit at this step (its checkpoints written first), once per run
    step_delay_s: float = 0.0  # sleep after each step: a short run stays alive long enough to signal it
    val_delay_s: float = 0.0
    checkpoint_write_delay_s: float = 0.0  # a background checkpoint waits this long written but not visible (kill it then)
    fail_at_start: Optional[int] = None  # SIGKILL this global rank before it joins the group, first attempt only


@dataclass
class Config:
    job: Any = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
    dist: DistConfig = field(default_factory=DistConfig)
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
    cs.store(group="job", name="images_schema", node=ImagesJob)


def get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


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
