#!/usr/bin/env bash
# The whole product on one GPU, end to end, sized for under 5 minutes on an H100 (each step has its own
# timeout, 570 s in all, so a stuck step still leaves its log), on the bare GPU machine
# (python3 and torch only: shared/gpu-wheels/README.md). From the repository root, with the wheels copied
# to .whl/ as that README says:
#
#   run(command="bash benchmarks/gpu_e2e.sh", carry=[".whl"], timeout_s=420)
#   E2E_CPU=1 benchmarks/gpu_e2e.sh     # dry run on a CPU: the same steps at tiny sizes, GPU-only checks SKIP
#   MODEL=vit benchmarks/gpu_e2e.sh     # ViT-B/16 instead of ResNet-50 (synthetic job)
#
# Steps: the device-path checks (benchmarks/gpu_checks.py: API, hand-off snapshots bit-equal to the EMA
# at put(), the device gate bit-equal to the host gate, fsdp at bf16 with a BatchNorm model, prefetch);
# autobatch with the validator on the same GPU (its budget in autobatch.json); training with the EMA and
# the validator (policy=all: every snapshot validated) with every host sync counted; a real CUDA OOM
# halved in place; `launcher report`; speed like for like (benchmarks/overhead.py --like-for-like).
# What comes back, in $OUT (default $BENCH_OUT, else benchmarks/out): gpu_e2e.log (one PASS/FAIL/SKIP
# line per check, and the figures), overhead.json (the speed rows), gpu_e2e-logs.tar.gz (every step's
# output and the runs' small files). Exit status: the number of FAILs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${BENCH_OUT:-benchmarks/out}}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
PY=${PYTHON:-python3}
MODEL=${MODEL:-resnet}
CPU=${E2E_CPU:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_e2e.XXXXXX")
LOG="$OUT/gpu_e2e.log"
exec > >(tee "$LOG") 2>&1
T0=$SECONDS
FAILS=0

# The bare machine: its wheels (hydra, omegaconf, mnist1d and theirs) into .site, then this project as a
# user installs it; the checkout itself if that install fails.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
if [ -d .whl ] && ! $PY -c 'import hydra' 2> /dev/null; then
  $PY -m pip install -q --no-index --no-deps --target .site .whl/*.whl > "$WORK/pip.out" 2>&1
  if $PY -m pip install -q --no-index --no-deps --no-build-isolation --target .site . >> "$WORK/pip.out" 2>&1; then
    echo "setup: wheels and the project installed into .site"
    export PYTHONPATH="$PWD/.site"
  else
    echo "setup: wheels installed; the project install failed (see pip.out): using the checkout"
    export PYTHONPATH="$PWD/.site:$PWD"
  fi
fi

# DataLoader workers pass whole batches through /dev/shm (128 x 3x224x224 fp32 = 77 MB each, workers x
# prefetch of them in flight): a container's small /dev/shm kills them with a bus error.
SHM_GB=$(df -BG --output=size /dev/shm 2> /dev/null | tail -1 | tr -dc 0-9)
SHM_GB=${SHM_GB:-0}
W=8; [ "$SHM_GB" -lt 24 ] && W=4; [ "$SHM_GB" -lt 4 ] && W=0
VB=1000; [ "$W" -lt 8 ] && VB=256  # the validator's batches go through /dev/shm too
COMMON=(job=synthetic "job.model=$MODEL" job.train_samples=8192 job.val_samples=1024 train.precision=bf16
        "data.workers=$W" "validation.workers=$W" "validation.batch_size=$VB" train.log_every=10
        logger.progress=plain logger.wandb.mode=disabled logger.telemetry.every_s=1)
BATCH=128; LIKE=(--models "$MODEL" --repeat 1 --workers "$W")
if [ "$CPU" = 1 ]; then  # tiny nets: the same steps, to check this script and the product on a CPU
  COMMON=(job=synthetic "job.model=$MODEL" job.width=8 job.depth=[1,1,1,1] job.dim=64 job.layers=2 job.heads=2
          job.patch=8 job.image_size=32 job.num_classes=10 job.train_samples=2048 job.val_samples=128
          train.precision=fp32 data.workers=0 validation.workers=0 validation.batch_size=64 train.log_every=10
          logger.progress=plain logger.wandb.mode=disabled logger.telemetry.every_s=0)
  BATCH=16; LIKE=(--quick --models "$MODEL" --repeat 1)
  export OMP_NUM_THREADS=1
fi
echo "gpu_e2e: $(date -u '+%F %H:%M UTC'), $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'), model $MODEL, /dev/shm ${SHM_GB} GiB -> $(printf '%s\n' "${COMMON[@]}" | grep -E '^data.workers=')"
if [ "$CPU" != 1 ] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "FAIL setup: no CUDA device visible; this script needs a GPU (E2E_CPU=1 for a dry run)"; exit 1
fi
# A micro-batch no GPU of this size holds (ResNet-50 at bf16 peaks near 1856 on 80 GB, ViT-B/16 near 1184).
OOM_BATCH=0; [ "$CPU" = 1 ] || OOM_BATCH=$($PY -c 'import torch; print(2048 if torch.cuda.get_device_properties(0).total_memory < 90 * 2**30 else 4096)')

step() {  # step <name> <seconds> <command or function...>: output in $WORK/<name>.out, PASS/FAIL
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  if [ "$(type -t "$1")" = function ]; then  # its commands run under `timeout -k 10 "$LIMIT"` themselves
    LIMIT=$secs "$@" > "$WORK/$name.out" 2>&1
  else
    timeout -k 10 "$secs" "$@" > "$WORK/$name.out" 2>&1
  fi
  local rc=$?
  grep -E '^(PASS|FAIL|SKIP) |^figures:' "$WORK/$name.out" | cut -c1-400 | sed 's/^/  /'  # checks and figures
  if [ $rc = 0 ]; then
    echo "PASS $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL $name ($((SECONDS - t0)) s, exit $rc): last lines:"; tail -n 12 "$WORK/$name.out" | cut -c1-240 | sed 's/^/    /'
    FAILS=$((FAILS + 1))
  fi
}

check() {  # check <run dir> <python expression over ev, m, val, summary, ab, kinds>: prints the figures
  $PY - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
d, expr = Path(sys.argv[1]), sys.argv[2]
rd = lambda n: [json.loads(l) for l in (d / n).read_text().splitlines() if l.strip()] if (d / n).exists() else []
ev, m, val = rd("events.jsonl"), rd("metrics.jsonl"), rd("val/results.jsonl")
summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
ab = json.loads((d / "autobatch.json").read_text()) if (d / "autobatch.json").exists() else {}
kinds = [e["event"] for e in ev]
rates = sorted(r["samples_per_s"] for r in m if "samples_per_s" in r)
print("figures:", {"micro_batch": summary.get("micro_batch"), "steps": summary.get("steps"),
      "median samples/s": round(rates[len(rates) // 2], 1) if rates else None,
      "validated": [v["step"] for v in val], "val batch": sorted({v.get("batch_size") for v in val}),
      "oom": [(e["event"], e.get("micro_from"), e.get("micro_to")) for e in ev if "oom" in e["event"]],
      "validator_budget_GiB": round((ab.get("validator_budget_bytes") or 0) / 2**30, 2),
      "gpu rows": sum("gpu" in r for r in m)})
sys.exit(0 if eval(f"({expr})") else 1)
EOF
}

# 1. What only a GPU proves (each check a line; a dry run SKIPs the GPU-only ones).
step checks 90 $PY benchmarks/gpu_checks.py

# 2. Autobatch on the one GPU the validator process shares: the probe leaves it validation.gpu_share.
R2="$WORK/autobatch"
autobatch() {
  timeout -k 10 "$LIMIT" $PY -m launcher train "${COMMON[@]}" batch.size=auto train.max_steps=10 autobatch.max_probes=6 \
    validation.mode=process run.dir="$R2" &&
    check "$R2" "summary.get('steps') == 10 and ($CPU == 1 or (ab.get('reason') == 'probed'
                 and ab.get('validator_budget_bytes', 0) > 0))"
}
step autobatch 100 autobatch

# 3. Training with the EMA and the validator on the same GPU, every snapshot validated (policy=all), every
#    host-device sync counted (gpu_checks.py sync): none may come once per step.
R3="$WORK/train"
train_synced() {
  timeout -k 10 "$LIMIT" $PY benchmarks/gpu_checks.py sync "${COMMON[@]}" batch.size=$BATCH train.max_steps=40 validation.every_steps=10 \
    validation.policy=all checkpoint.every_steps=0 run.dir="$R3" &&
    check "$R3" "summary.get('steps') == 40 and [v['step'] for v in val] == [10, 20, 30, 40]
                 and summary.get('ema_updates') == 40 and summary.get('unvalidated_steps') == []"
}
step train_synced 100 train_synced

# 4. Out of memory: on a GPU a real one (a micro-batch no GPU holds), halved in place until it fits; on a
#    CPU the injected one.
R4="$WORK/oom"
oom() {
  local how=(batch.size=$OOM_BATCH job.train_samples=$((2 * OOM_BATCH)) "data.workers=$((W < 2 ? W : 2))" data.prefetch=1)
  [ "$CPU" = 1 ] && how=(batch.size=$BATCH debug.simulate_oom_at_step=2)
  timeout -k 10 "$LIMIT" $PY -m launcher train "${COMMON[@]}" "${how[@]}" train.max_steps=2 validation.mode=off run.dir="$R4" &&
    check "$R4" "'oom_retry' in kinds and summary.get('steps') == 2"
}
step oom 90 oom

# 5. The report, from a run directory alone.
step report 40 $PY -m launcher report "$R3"

# 6. Speed like for like: the launcher against the bare loop on the same data path and channels_last, then
#    the data path and validation (with its checkpoints) each on a line of its own.
step speed 150 env BENCH_OUT="$OUT" $PY benchmarks/overhead.py --like-for-like "${LIKE[@]}"
$PY - "$OUT/overhead.json" "$CPU" <<'EOF' || FAILS=$((FAILS + 1))
import json, sys
rows, cpu = json.load(open(sys.argv[1]))["rows"], sys.argv[2] == "1"
for r in rows:
    line = f"{r['case']}: ours {r['ours']} {r['unit']}, {r['baseline_name']} {r['baseline']}, ratio {r['ratio']}"
    status = "    " if r["met"] is None else "SKIP" if cpu else "PASS" if r["met"] else "FAIL"
    print(f"{status} {line}" + (f" (target {r['target']}{', CPU timings: not judged' if cpu else ''})" if r["target"] else ""))
sys.exit(0 if cpu or all(r["met"] is not False for r in rows) else 1)
EOF

for d in "$R2" "$R3" "$R4"; do [ -d "$d" ] && find "$d" -name '*.safetensors' -o -name '*.pt' -o -name '*.dcp' | xargs rm -rf; done
tar -czf "$OUT/gpu_e2e-logs.tar.gz" -C "$WORK" . 2> /dev/null
echo "gpu_e2e: $FAILS failed step(s) in $((SECONDS - T0)) s; logs in $OUT/gpu_e2e-logs.tar.gz"
exit "$FAILS"
