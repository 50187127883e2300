"""NVML GPU telemetry: a daemon thread samples, the loop takes aggregates when it logs.

NVML never sits on the hot path. No driver or library: one info line, then nothing.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

from launcher.telemetry.off import OFF

log = logging.getLogger("launcher")


def nvml_uuids(torch_uuid: Any) -> List[str]:
    """NVML's names for a CUDA device whose UUID torch prints without a prefix: "GPU-<uuid>" for a whole
    GPU, "MIG-<uuid>" for a MIG instance (with MIG on, CUDA devices are instances)."""
    text = str(torch_uuid)
    return [text] if text.startswith(("GPU-", "MIG-")) else [f"GPU-{text}", f"MIG-{text}"]


def _handle(nvml, torch_uuid: Any) -> Tuple[Any, str]:
    """(NVML handle, its UUID) of a CUDA device: the first of its possible names NVML knows."""
    names = nvml_uuids(torch_uuid)
    for name in names[:-1]:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(name.encode()), name
        except nvml.NVMLError:
            pass
    return nvml.nvmlDeviceGetHandleByUUID(names[-1].encode()), names[-1]


class GpuMonitor:
    """NVML samples of the given CUDA devices, taken by a daemon thread and aggregated per log step.

    Devices are mapped by UUID (torch's view -> NVML handle): NVML ignores
    CUDA_VISIBLE_DEVICES and may order GPUs differently from CUDA.
    """

    def __init__(self, nvml, handles: Dict[int, Any], uuids: Dict[int, str], every_s: float):
        self.nvml, self.handles, self.uuids, self.every_s = nvml, handles, uuids, every_s
        self.samples: List[Dict[int, dict]] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nvml-telemetry", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, cuda_indices: List[int], every_s: float):
        """A running monitor, or OFF with one info line saying why (no driver, no library, no GPU)."""
        if every_s <= 0:
            return OFF
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded, ImportError
            log.info("telemetry: NVML not available (%s); GPU telemetry off", e)
            return OFF
        if not cuda_indices:
            log.info("telemetry: this run uses no CUDA device; GPU telemetry off")
            return OFF
        try:
            import torch

            handles, uuids = {}, {}
            for i in cuda_indices:
                handles[i], uuids[i] = _handle(pynvml, torch.cuda.get_device_properties(i).uuid)
        except Exception as e:
            log.info("telemetry: cannot map CUDA devices to NVML (%s); GPU telemetry off", e)
            return OFF
        log.info("telemetry: sampling %d GPU(s) every %.1fs: %s", len(handles), every_s, ", ".join(uuids.values()))
        return cls(pynvml, handles, uuids, every_s)

    def _sample(self) -> Dict[int, dict]:
        nv, out = self.nvml, {}
        for i, h in self.handles.items():
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            row = {"mem_used_gb": mem.used / 2**30, "mem_total_gb": mem.total / 2**30}
            try:  # not supported on every board: a MIG instance has no utilization, power or temperature
                row["util"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                row["power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                row["temp_c"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except nv.NVMLError:
                pass
            out[i] = row
        return out

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                sample = self._sample()
            except Exception as e:
                log.warning("telemetry: NVML sampling failed (%s); GPU telemetry off from here", e)
                return
            with self.lock:
                self.samples.append(sample)
            self.stop_event.wait(self.every_s)

    def take(self) -> Optional[List[dict]]:
        """Per GPU since the last call: mean utilization and power, peak memory, last temperature."""
        with self.lock:
            samples, self.samples = self.samples, []
        if not samples:
            return None
        rows = []
        for i in self.handles:
            seq = [s[i] for s in samples if i in s]
            row = {"index": i, "uuid": self.uuids[i],
                   "mem_used_gb": max(r["mem_used_gb"] for r in seq), "mem_total_gb": seq[-1]["mem_total_gb"]}
            if "util" in seq[-1]:
                row["util"] = sum(r.get("util", 0.0) for r in seq) / len(seq)
            if "power_w" in seq[-1]:
                row["power_w"] = sum(r.get("power_w", 0.0) for r in seq) / len(seq)
                row["temp_c"] = seq[-1]["temp_c"]
            rows.append(row)
        return rows

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def node_cuda_indices(env: Any, cfg: Any) -> List[int]:
    """The CUDA devices of this node's ranks as rank 0 sees them: trainers, a validator rank, and the next
    GPU for a lone trainer's validator process (it takes its own GPU when one is free)."""
    if env is None or getattr(env.device, "type", "cpu") != "cuda":
        return []
    import torch

    extra = int(env.validation_mode == "process")
    return list(range(min(max(env.local_world_size, 1) + extra, torch.cuda.device_count())))
