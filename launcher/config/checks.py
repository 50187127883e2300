"""The rules a type cannot express: ranges, formats, impossible combinations.

`check(cfg, world_size)` runs before any process group exists, so bad input is one
line and exit status 2 (the CLI turns ConfigError into that).
"""
from __future__ import annotations

import signal
from typing import Any, Iterable, List, Optional

from launcher.config.schema import Config, get, validation_mode
from launcher.errors import ConfigError

POSITIVE = ("train.log_every", "ema.every", "data.prefetch", "ddp.bucket_cap_mb", "checkpoint.keep_last", "optim.lr",
            "validation.queue", "early_stop.window", "autobatch.max", "autobatch.max_probes", "dist.timeout_s")
NON_NEGATIVE = ("validation.drain_timeout_s", "checkpoint.drain_timeout_s", "debug.checkpoint_write_delay_s",
                "train.epochs", "train.max_steps", "train.grad_clip", "train.threads",
                "sched.warmup_steps", "sched.warmup_epochs", "checkpoint.every_steps", "validation.every_steps",
                "validation.every_epochs", "early_stop.patience", "debug.val_delay_s", "debug.step_delay_s",
                "autobatch.max_retries", "data.workers")
FSDP_FP16 = ("train.precision=fp16 is not supported with train.strategy=fsdp (the GradScaler's overflow check would "
             "see each rank's shards only); use train.precision=bf16 or fp32, or train.strategy=ddp")

UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def parse_signals(names: Iterable[str]) -> List[signal.Signals]:
    """`["SIGTERM", "USR1", 15]` -> signals; a ValueError names the bad one."""
    out = []
    for name in names:
        text = str(name).upper()
        text = text if text.isdigit() or text.startswith("SIG") else "SIG" + text
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[text]
        except (KeyError, ValueError):
            raise ValueError(f"run.stop_signals: {name!r} is not a signal; use names like SIGTERM, SIGINT, "
                             "SIGUSR1, SIGUSR2, SIGHUP") from None
        if sig.name in UNCATCHABLE:
            raise ValueError(f"run.stop_signals: {sig.name} cannot be caught; use SIGTERM, SIGINT, SIGUSR1, ...")
        out.append(sig)
    return out


def _size_or_auto(key: str, value: Any) -> None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    raise ConfigError(f"{key}={value!r} is not valid; use a positive integer or 'auto'")


def check_device(key: str, value: str) -> None:
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ConfigError(f"{key}={value!r} is not valid; use auto, cpu, cuda or cuda:<index>")


def check_global_size(cfg: Config, world_size: int) -> None:
    """batch.global_size must split evenly over the training ranks: a silent floor (256 over 7 ranks
    -> 252) would change the effective batch. The usual cause is the validator rank taking one of the
    processes (8 GPUs -> 7 trainers), so the message names it and the launches that work."""
    size = cfg.batch.global_size
    if size is None or size <= 0 or world_size < 2:
        return
    validator = validation_mode(cfg.validation.mode, world_size) == "rank"
    train_world = world_size - 1 if validator else world_size
    if size % train_world == 0:
        return
    lo, hi = size // train_world * train_world, -(-size // train_world) * train_world
    sizes = f"{lo} or {hi}" if lo else f"{hi}"
    msg = f"batch.global_size={size} is not divisible by the {train_world} training ranks"
    msg += f" (it would be floored to {lo})" if lo else ""
    if validator:
        msg += (f"; {world_size} processes, one of them the validator rank of validation.mode="
                f"{cfg.validation.mode}: use batch.global_size={sizes}, or train on all {world_size} "
                f"processes with validation.mode=process (the validator as a side process on a shared GPU), or "
                f"on one node with {world_size} GPUs launch {world_size + 1} processes with "
                "validation.share_gpu=true (all GPUs train, the validator shares one)")
    else:
        msg += f"; use batch.global_size={sizes}, or a number of processes that divides {size}"
    raise ConfigError(msg)


def check_fsdp(cfg: Config) -> None:
    """What FSDP2 cannot do: NHWC weights (it shards contiguous parameters only: "FSDP does not support
    non-contiguous parameters yet"), or a fused SGD step (no DTensor rule for aten._fused_sgd_; the default
    is foreach under fsdp, see optim.py). A torch without the FSDP2 API: startup.precheck."""
    if cfg.train.channels_last:
        raise ConfigError("train.channels_last=true is not supported with train.strategy=fsdp (FSDP2 shards "
                          "contiguous parameters only); use train.channels_last=false, or train.strategy=ddp")
    if cfg.optim.name == "sgd" and cfg.optim.fused:
        raise ConfigError("optim.fused=true with optim.name=sgd is not supported with train.strategy=fsdp (fused "
                          "SGD has no rule for sharded parameters); leave optim.fused unset (foreach), use "
                          "optim=adamw, or train.strategy=ddp")


def check(cfg: Config, world_size: Optional[int] = 1) -> None:
    """Reject what the types cannot: bad choices, ranges, impossible combinations. `world_size` None: not
    known here (a sweep point that runs elsewhere), so the rules that depend on it wait for its launch."""
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
    if not 0.0 <= cfg.validation.gpu_share < cfg.autobatch.fraction:
        raise ConfigError(f"validation.gpu_share={cfg.validation.gpu_share} is not valid; it must be in [0, "
                          f"autobatch.fraction={cfg.autobatch.fraction}): the share of a GPU left to a validator on it")
    if cfg.batch.global_size is not None and cfg.batch.global_size <= 0:
        raise ConfigError(f"batch.global_size={cfg.batch.global_size} is not valid; it must be > 0")
    check_global_size(cfg, world_size or 1)
    if cfg.validation.mode == "rank" and world_size == 1:
        raise ConfigError("validation.mode=rank needs at least 2 processes (torchrun --nproc_per_node>=2); "
                          "with one process use validation.mode=process, inline or off")
    if world_size and not -world_size <= cfg.validation.rank < world_size:  # the same rule for 1 process and N
        raise ConfigError(f"validation.rank={cfg.validation.rank} is not valid for {world_size} process"
                          f"{'es' if world_size > 1 else ''}; use -{world_size}..{world_size - 1}")
    if cfg.validation.share_gpu and cfg.validation.mode not in ("auto", "rank"):
        raise ConfigError(f"validation.share_gpu=true is for the validator rank, not validation.mode="
                          f"{cfg.validation.mode}; use validation.mode=auto or rank, or drop validation.share_gpu")
    if cfg.validation.weights in ("ema", "both") and not cfg.ema.enabled and cfg.validation.mode != "off":
        raise ConfigError(f"validation.weights={cfg.validation.weights} needs ema.enabled=true; "
                          "use validation.weights=raw or enable the EMA")
    if cfg.train.strategy == "fsdp" and cfg.train.precision == "fp16":
        raise ConfigError(FSDP_FP16)
    if cfg.train.strategy == "fsdp" and cfg.validation.mode == "inline" and (world_size or 1) >= 2:
        raise ConfigError("validation.mode=inline is not supported with train.strategy=fsdp on 2+ processes (rank 0 "
                          "alone would evaluate a sharded model); use validation.mode=auto, process or off")
    if cfg.train.strategy == "fsdp" and cfg.train.compile:
        raise ConfigError("train.compile=true is not supported with train.strategy=fsdp; "
                          "use train.compile=false, or train.strategy=ddp to compile")
    if cfg.train.strategy == "fsdp":
        check_fsdp(cfg)
    try:
        parse_signals(cfg.run.stop_signals)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    oom = cfg.debug.simulate_oom_above
    if oom is not None:
        limits = list(oom) if isinstance(oom, (list, tuple)) or hasattr(oom, "__iter__") and not isinstance(oom, str) else [oom]
        if not limits or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in limits):
            raise ConfigError(f"debug.simulate_oom_above={oom!r} is not valid; use a positive int or a list of them")
