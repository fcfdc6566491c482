#!/usr/bin/env bash
# Checks the framework on one NVIDIA GPU in under 8 minutes, from the
# repository root:
#
#   bash benchmarks/accelerator_check.sh
#
#   1. install   a venv with `pip install -e '.[cuda12]'`
#   2. devices   nvidia-smi, JAX's devices and the run's platform line
#   3. resnet50  ResNet-50 on synthetic data in bfloat16 (--require_accelerator):
#                examples/s and MFU from summary.json
#   4. vectorize the default 16-trial study of configs/mnist1d_cnn.py as one
#                population (--vectorize=16) against some of its trials
#                trained alone: largest relative difference of the losses
#                and eval metrics
#   5. share     two study workers on the one GPU (--parallel=2
#                --share_devices, XLA_PYTHON_CLIENT_MEM_FRACTION)
#
# Every section has its own time limit, cut to what is left of TOTAL_S, and a
# failed section does not stop the next ones; the last line is
# `accelerator_check: N passed, M failed, K skipped`.
#
# Settings (environment):
#   SMOKE=1        tiny step counts on the current `python`, no install (CPU)
#   PYTHON=...     the interpreter for the venv (default: python3 if >= 3.11)
#   VENV=...       the venv (default $WORK/venv); SKIP_INSTALL=1 uses it as it is
#   WORK=...       scratch directory (default: a new /tmp/accelerator_check.*)
#   OUT=...        where the log and summaries are copied (default: $WORK)
#   TOTAL_S=470    the whole script's time budget in seconds
# shellcheck disable=SC2329  # The sections are called through run_section.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
SMOKE=${SMOKE:-0}
TOTAL_S=${TOTAL_S:-470}
WORK=${WORK:-$(mktemp -d /tmp/accelerator_check.XXXXXX)}
OUT=${OUT:-$WORK}
mkdir -p "$WORK" "$OUT"
VENV=${VENV:-$WORK/venv}
LOG="$OUT/accelerator_check.log"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

if [[ $SMOKE == 1 ]]; then
  RESNET_STEPS=2 RESNET_BATCH=8 RESNET_LOG=1
  RESNET_MODEL=(--config.model.depth=18 --config.model.width_multiplier=0.25)
  STUDY_STEPS=40 STUDY_TRIALS=4 ALONE_TRIALS=2 SHARE_TRIALS=2
else
  RESNET_STEPS=300 RESNET_BATCH=256 RESNET_LOG=50 RESNET_MODEL=()
  STUDY_STEPS=500 STUDY_TRIALS=16 ALONE_TRIALS=3 SHARE_TRIALS=4
fi
# The studies' shared flags: the default search space of the MNIST-1D CNN.
STUDY_FLAGS=(--config=configs/mnist1d_cnn.py --seed=0
             --config.max_train_steps="$STUDY_STEPS"
             --config.eval_every_steps=$((STUDY_STEPS / 4))
             --config.log_every_steps=$((STUDY_STEPS / 20)))
export TF_CPP_MIN_LOG_LEVEL=2
START=$(date +%s)
PASSED=0 FAILED=0 SKIPPED=0

remaining() { echo $((TOTAL_S - ($(date +%s) - START))); }

# run_section NAME CAP_S FUNCTION: runs FUNCTION; the commands it runs through
# `limited` end by min(CAP_S, the budget left) after its start.
run_section() {
  local name=$1 cap=$2 fn=$3 left limit t0 rc why=""
  left=$(remaining)
  limit=$((cap < left - 5 ? cap : left - 5))
  if ((limit < 20)); then
    echo "=== $name: SKIPPED (${left}s of TOTAL_S=${TOTAL_S}s left)"
    SKIPPED=$((SKIPPED + 1))
    return
  fi
  echo "=== $name (limit ${limit}s)"
  t0=$(date +%s)
  SECTION_END=$((t0 + limit))
  "$fn"
  rc=$?
  if ((rc == 0)); then
    echo "=== $name: PASSED in $(($(date +%s) - t0))s"
    PASSED=$((PASSED + 1))
  else
    ((rc == 124 || rc == 137)) && why=", time limit"
    echo "=== $name: FAILED (status $rc$why) after $(($(date +%s) - t0))s"
    FAILED=$((FAILED + 1))
  fi
}

# limited CMD...: CMD until the section's end (SIGTERM, then SIGKILL).
limited() {
  local left=$((SECTION_END - $(date +%s)))
  ((left > 0)) || return 124
  timeout --kill-after=10 "$left" "$@"
}

find_python() {
  local candidate
  for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" > /dev/null &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

section_install() {
  local python
  python=$(find_python) || { echo "no Python >= 3.11 (set PYTHON=...)"; return 1; }
  if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    limited "$python" -m venv "$VENV" || return
    # shellcheck disable=SC1091
    . "$VENV/bin/activate" || return
    limited pip install --progress-bar off -q -e '.[cuda12]' || return
  else
    # shellcheck disable=SC1091
    . "$VENV/bin/activate" || return 1
  fi
  python --version
  pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|jax-cuda12-plugin|jax-cuda12-pjrt|nvidia-cudnn-cu12|tensorflow-cpu|tensorflow|flax) '
}

section_devices() {
  local smi=0
  if command -v nvidia-smi > /dev/null; then
    limited nvidia-smi
    smi=$?
  else
    echo "nvidia-smi: not found"
    [[ $SMOKE == 1 ]] || smi=1
  fi
  limited python - "$SMOKE" <<'EOF' || return
import sys
import jax
from tuning_playbook.common import platform_check
print("jax.devices():", jax.devices())
print(platform_check.describe())
if sys.argv[1] != "1" and jax.default_backend() != "gpu":
  sys.exit(f"JAX runs on {jax.default_backend()}, not a GPU")
EOF
  return "$smi"
}

section_resnet50() {
  local workdir=$WORK/resnet50 require=(--require_accelerator)
  [[ $SMOKE == 1 ]] && require=()
  rm -rf "$workdir"
  limited python -m tuning_playbook.main --config=configs/imagenet_resnet50.py \
      --workdir="$workdir" "${require[@]}" "${RESNET_MODEL[@]}" \
      --config.data.synthetic=True --config.compute_dtype=bfloat16 \
      --config.batch_size="$RESNET_BATCH" --config.max_train_steps="$RESNET_STEPS" \
      --config.eval_every_steps="$RESNET_STEPS" --config.log_every_steps="$RESNET_LOG" \
      --config.num_best_checkpoints=1 > "$WORK/resnet50.log" 2>&1
  local rc=$?
  ((rc == 0)) || { tail -30 "$WORK/resnet50.log"; return "$rc"; }
  grep -E "JAX platform:|FLOPs per step|The model computes in" "$WORK/resnet50.log"
  cp "$workdir/summary.json" "$OUT/resnet50_summary.json" 2>/dev/null
  python - "$workdir/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
p = s["perf"]
fmt = lambda v, f: "n/a" if v is None else format(v, f)
print(f"resnet50 status={s['status']} steps={s['final_step']} "
      f"device={p.get('device_kind')} x{p.get('device_count')} "
      f"dtype={p.get('compute_dtype')} steps_timed={p.get('steps_timed')}")
print(f"resnet50 examples_per_second={fmt(p.get('examples_per_second'), '.1f')} "
      f"mfu={fmt(p.get('mfu'), '.4f')} "
      f"flops_per_second={fmt(p.get('flops_per_second'), '.4g')} "
      f"flops_per_step={fmt(p.get('flops_per_step'), '.4g')} "
      f"input_wait={fmt(s['input_bound'].get('mean_wait_fraction'), '.3f')}")
sys.exit(s["status"] != "completed")
EOF
}

section_vectorize() {
  local study=$WORK/vectorized t0 rc
  rm -rf "$study" "$WORK/alone"
  t0=$(date +%s)
  limited python -m tuning_playbook.sweep "${STUDY_FLAGS[@]}" --study_dir="$study" \
      --num_trials="$STUDY_TRIALS" --run --vectorize="$STUDY_TRIALS" \
      > "$WORK/vectorized.log" 2>&1
  rc=$?
  ((rc == 0)) || { tail -30 "$WORK/vectorized.log"; return "$rc"; }
  echo "vectorized study: $STUDY_TRIALS trials in $(($(date +%s) - t0))s"
  cp "$study/results.csv" "$OUT/vectorized_results.csv"
  # The first trials again, each alone (python -m tuning_playbook.main, a
  # population of one), and the first one twice (the run-to-run spread): all
  # at once, each preallocating 15% of the GPU's memory.
  limited python - "$study" "$WORK/alone" "$ALONE_TRIALS" <<'EOF'
import csv, json, math, os, shlex, subprocess, sys, time

study, alone, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = list(csv.DictReader(open(os.path.join(study, "results.csv"))))[:count]


def train_alone(jobs):
  """Trains each (row, workdir) alone, all at once (small next to the GPU)."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.15")
  t0 = time.time()
  procs = []
  for row, workdir in jobs:
    argv = [a for a in shlex.split(row["command"]) if not a.startswith("--workdir=")]
    argv = [sys.executable] + argv[1:] + [f"--workdir={workdir}"]
    log = open(workdir + ".log", "w")
    procs.append((row, workdir, subprocess.Popen(argv, stdout=log, stderr=log, env=env)))
  for row, workdir, proc in procs:
    if proc.wait():
      sys.exit(f"trial {row['trial_id']} alone failed (status {proc.returncode}):\n"
               + open(workdir + ".log").read()[-3000:])
  print(f"{len(jobs)} runs alone, side by side: {time.time() - t0:.1f}s")


def metrics(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/validation/loss" in r]
  return {"first train/loss": train[0]["train/loss"],
          "final train/loss": train[-1]["train/loss"],
          "final eval/validation/loss": evals[-1]["eval/validation/loss"],
          "final eval/validation/error_rate": evals[-1]["eval/validation/error_rate"],
          "final eval/test/accuracy": evals[-1]["eval/test/accuracy"]}, train


def rel(a, b):
  """|a - b| relative to the larger; 0 when both are NaN/Inf (diverged)."""
  if not (math.isfinite(a) and math.isfinite(b)):
    return 0.0 if not (math.isfinite(a) or math.isfinite(b)) else math.inf
  return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare(label, dir_a, dir_b):
  (ma, ta), (mb, tb) = metrics(dir_a), metrics(dir_b)
  diffs = {k: rel(ma[k], mb[k]) for k in ma}
  diffs["train/loss, any logged step"] = max(
      rel(a["train/loss"], b["train/loss"]) for a, b in zip(ta, tb))
  print(f"{label}: " + ", ".join(f"{k} {ma[k]:.6g} vs {mb[k]:.6g}"
                                 for k in ma if k.startswith("final")))
  return diffs


def report(label, all_diffs):
  for key in all_diffs[0]:
    print(f"{label} max relative difference, {key}: "
          f"{max(d[key] for d in all_diffs):.3g}")


os.makedirs(alone, exist_ok=True)
again = os.path.join(alone, rows[0]["trial_id"] + "_again")
train_alone([(r, os.path.join(alone, r["trial_id"])) for r in rows] + [(rows[0], again)])
vectorized = [compare(f"trial {r['trial_id']} population vs alone",
                      os.path.join(study, "trials", r["trial_id"]),
                      os.path.join(alone, r["trial_id"])) for r in rows]
repeat = [compare(f"trial {rows[0]['trial_id']} alone vs alone", again,
                  os.path.join(alone, rows[0]["trial_id"]))]
report(f"population vs alone ({len(rows)} trials)", vectorized)
report("alone vs alone (run-to-run)", repeat)
EOF
}

# Polls the GPU's compute processes until the file $1 exists.
watch_gpu_processes() {
  local stop=$1 most=0 count
  command -v nvidia-smi > /dev/null || { echo "gpu processes at once: n/a"; return; }
  while [[ ! -e $stop ]]; do
    count=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | tee -a "$WORK/gpu_processes.csv" | grep -c .)
    ((count > most)) && most=$count
    sleep 1
  done
  echo "gpu processes at once (most seen): $most"
  sort -u "$WORK/gpu_processes.csv" | head -8
}

section_share() {
  local study=$WORK/shared stop=$WORK/share.done t0 rc watcher
  rm -rf "$study" "$stop" "$WORK/gpu_processes.csv"
  watch_gpu_processes "$stop" &
  watcher=$!
  t0=$(date +%s)
  # Two JAX processes on one GPU: each preallocates 35% of its memory.
  limited env XLA_PYTHON_CLIENT_MEM_FRACTION=0.35 python -m tuning_playbook.sweep \
      "${STUDY_FLAGS[@]}" --study_dir="$study" --num_trials="$SHARE_TRIALS" --run \
      --parallel=2 --share_devices > "$WORK/shared.log" 2>&1
  rc=$?
  touch "$stop"
  wait "$watcher"
  echo "two workers: $SHARE_TRIALS trials in $(($(date +%s) - t0))s, status $rc"
  ((rc == 0)) || { tail -30 "$WORK/shared.log"; return "$rc"; }
  cp "$study/results.csv" "$OUT/shared_results.csv"
  local log
  for log in "$study"/workers/*.log; do  # Each worker's device and first trial.
    echo "$(basename "$log"): $(grep -m1 -o "device(s) of kind '[^']*'" "$log")"
    grep -m1 "Training .* trial(s)" "$log"
  done
  python - "$study" <<'EOF'
import csv, os, sys
rows = list(csv.DictReader(open(os.path.join(sys.argv[1], "results.csv"))))
for r in rows:
  print(f"trial {r['trial_id']}: {r['status']} best {r['best_metric']}={r['best_value']}")
sys.exit(any(r["status"] not in ("completed", "diverged") for r in rows))
EOF
}

finish() {
  echo "accelerator_check: $PASSED passed, $FAILED failed, $SKIPPED skipped in $(($(date +%s) - START))s"
  exec 1>&- 2>&-  # Lets tee write the last lines before the script exits.
  wait "$TEE_PID"
  exit $((FAILED == 0 ? 0 : 1))
}

echo "accelerator_check: repo $REPO, work $WORK, SMOKE=$SMOKE, TOTAL_S=$TOTAL_S"
if [[ $SMOKE == 1 ]]; then
  echo "=== install: SKIPPED (SMOKE=1 uses $(command -v python))"
  SKIPPED=$((SKIPPED + 1))
else
  run_section install 240 section_install
  # shellcheck disable=SC1091
  . "$VENV/bin/activate" 2> /dev/null ||
      { echo "accelerator_check: no venv at $VENV, stopping"; FAILED=$((FAILED + 1)); finish; }
fi
run_section devices 60 section_devices
run_section resnet50 210 section_resnet50
run_section vectorize 210 section_vectorize
run_section share 150 section_share
finish
