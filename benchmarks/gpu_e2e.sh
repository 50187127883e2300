#!/usr/bin/env bash
# The whole product on one GPU, end to end. One PASS/FAIL line per step, then the figures.
#
#   benchmarks/gpu_e2e.sh            # ResNet-50 (synthetic job), bf16
#   MODEL=vit benchmarks/gpu_e2e.sh  # ViT-B/16
#   E2E_CPU=1 benchmarks/gpu_e2e.sh  # the same steps on a CPU with tiny nets (checks the script itself)
#
# Steps: autobatch on the synthetic job; training with EMA and a validator process sharing
# the GPU; a forced runtime OOM and its recovery; a real kill -9 and a resume; `launcher
# report`; the overhead benchmark against a bare DDP loop. The log goes to
# $BENCH_OUT/gpu_e2e.log (default benchmarks/out/), which run_all.py puts in RESULTS.md.
# Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODEL=${MODEL:-resnet}
OUT=${BENCH_OUT:-benchmarks/out}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_e2e.XXXXXX")
mkdir -p "$OUT"
LOG="$OUT/gpu_e2e.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline WANDB_SILENT=true
FAILS=0
COMMON=(job=synthetic "job.model=$MODEL" job.train_samples=8192 job.val_samples=1024 train.precision=bf16
        data.workers=8 train.log_every=10 logger.progress=plain logger.wandb.mode=offline)
QUICK=()
if [ "${E2E_CPU:-0}" = 1 ]; then  # tiny nets on a CPU: the same steps, to check the script and the product
  COMMON=(job=synthetic "job.model=$MODEL" job.width=8 job.depth=[1,1,1,1] job.dim=64 job.layers=2 job.heads=2
          job.patch=8 job.image_size=32 job.num_classes=10 job.train_samples=4096 job.val_samples=256
          train.precision=fp32 data.workers=1 train.log_every=10 logger.progress=plain logger.wandb.mode=offline)
  QUICK=(--quick)
  export OMP_NUM_THREADS=1
fi

exec > >(tee "$LOG") 2>&1
echo "gpu_e2e: $(date -u '+%Y-%m-%d %H:%M UTC') on $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'), model $MODEL, work dir $WORK"
if [ "${E2E_CPU:-0}" != 1 ] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "FAIL setup: no CUDA device visible; this script needs a GPU"
  exit 1
fi

step() {  # step <name> <command...>: runs it, prints PASS/FAIL, keeps its output in $WORK/<name>.out
  local name=$1; shift
  local t0=$SECONDS
  if "$@" > "$WORK/$name.out" 2>&1; then
    echo "PASS $name ($((SECONDS - t0)) s)"
  else
    echo "FAIL $name ($((SECONDS - t0)) s): last lines:"; tail -n 15 "$WORK/$name.out" | sed 's/^/    /'
    FAILS=$((FAILS + 1))
  fi
}

# Reads a run directory and asserts; prints "figure <key> <value>" lines.
check() {  # check <run_dir> <python expression over ev (events), m (metrics), val, summary, ab>
  $PY - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
d, expr = Path(sys.argv[1]), sys.argv[2]
rd = lambda n: [json.loads(l) for l in (d / n).read_text().splitlines() if l.strip()] if (d / n).exists() else []
ev, m, val = rd("events.jsonl"), rd("metrics.jsonl"), rd("val/results.jsonl")
summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
ab = json.loads((d / "autobatch.json").read_text()) if (d / "autobatch.json").exists() else {}
kinds = [e["event"] for e in ev]
start = next((e for e in ev if e["event"] == "start"), {})
rates = sorted(r["samples_per_s"] for r in m if "samples_per_s" in r)
print("figure micro_batch", start.get("micro_batch"), "| steps", summary.get("steps"),
      "| median samples/s", round(rates[len(rates) // 2], 1) if rates else None,
      "| validations", len(val), "| events", sorted(set(kinds)))
ok = eval(f"({expr})")  # parenthesised: the expression may span lines
sys.exit(0 if ok else 1)
EOF
}

# 1. Autobatch: probe the full step, pick the largest safe micro-batch, train on it.
R1="$WORK/autobatch"
autobatch() {
  $PY -m launcher train "${COMMON[@]}" run.dir="$R1" batch.size=auto train.max_steps=30 validation.mode=off &&
    check "$R1" '(d / "autobatch.json").exists() and summary.get("steps") == 30'
}
step autobatch autobatch
grep -h '^figure' "$WORK/autobatch.out"

# 2. Training with the EMA and a validator process on the same GPU (validation.mode=auto -> process).
R2="$WORK/train"
train_ema_validator() {
  $PY -m launcher train "${COMMON[@]}" run.dir="$R2" batch.size=128 train.max_steps=60 validation.every_steps=20 \
    validation.weights=ema &&
    check "$R2" 'summary.get("steps") == 60 and summary.get("ema_updates", 0) > 0 and len(val) >= 3
                 and all(v["weights"] == "ema" for v in val)'
}
step train_ema_validator train_ema_validator
grep -h '^figure' "$WORK/train_ema_validator.out"

# 3. A forced runtime OOM at step 15: the step is retried with a smaller micro-batch, the run finishes.
R3="$WORK/oom"
oom_recovery() {
  $PY -m launcher train "${COMMON[@]}" run.dir="$R3" batch.size=128 train.max_steps=30 validation.mode=off \
    debug.simulate_oom_at_step=15 &&
    check "$R3" '"oom_retry" in kinds and summary.get("steps") == 30'
}
step oom_recovery oom_recovery
grep -h '^figure' "$WORK/oom_recovery.out"

# 4. kill -9 mid-run (after a checkpoint), then relaunch the same command: it resumes.
R4="$WORK/resume"
kill_resume() {
  local args=("${COMMON[@]}" run.dir="$R4" batch.size=128 train.max_steps=60 checkpoint.every_steps=20
              validation.every_steps=20)
  setsid $PY -m launcher train "${args[@]}" > "$WORK/resume-first.out" 2>&1 &
  local pid=$!
  for _ in $(seq 1200); do
    ls "$R4"/checkpoints/step-*.json > /dev/null 2>&1 && break
    sleep 0.5
  done
  kill -9 -- -"$pid" 2> /dev/null
  wait "$pid" 2> /dev/null
  ls "$R4"/checkpoints/step-*.json > /dev/null 2>&1 || { echo "no checkpoint before the kill"; return 1; }
  $PY -m launcher train "${args[@]}" && check "$R4" '"resume" in kinds and summary.get("steps") == 60'
}
step kill_resume kill_resume
grep -h '^figure' "$WORK/kill_resume.out"

# 5. The report: plots and a summary from the run directory alone.
report() { $PY -m launcher report "$R2" && find "$R2" -name '*.png' | grep -q .; }
step report report

# 6. Speed: launcher train (EMA, validation, metrics) against a bare DDP loop, same run.
step overhead env BENCH_OUT="$OUT" $PY benchmarks/overhead.py "${QUICK[@]}" --models "$MODEL" --repeat 1 --no-options
grep -h '^overhead:' "$WORK/overhead.out"
$PY - "$OUT/overhead.json" <<'EOF' || FAILS=$((FAILS + 1))
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
bad = [r for r in rows if r["met"] is False]
for r in rows:
    if r["target"] is not None:
        print(f"{'PASS' if r['met'] else 'FAIL'} target {r['case']}: ratio {r['ratio']} (target {r['target']})")
sys.exit(1 if bad else 0)
EOF

echo "gpu_e2e: $FAILS failed step(s); runs kept in $WORK"
exit "$FAILS"
