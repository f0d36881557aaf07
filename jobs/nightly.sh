#!/usr/bin/env bash
# Nightly pipeline run for teams without Airflow: the same spark-submit as the lepton_spark_daily
# DAG (jobs/airflow/lepton_spark_dag.py), with the date as run key, so running it twice for a date
# trains once (the second run finds the finished MLflow run and exits 0).
#
#   jobs/nightly.sh [RUN_KEY]        RUN_KEY defaults to today's date, date +%F (2026-11-25)
#
# crontab line (02:30 every night; the script prints only a failure summary, which cron mails;
# cron's PATH is short, hence the full path and the .venv spark-submit default below):
#   30 2 * * * LEPTON_RETRY_DELAY=900 /opt/lepton-spark/jobs/nightly.sh
#
# Exit code: the pipeline's (jobs/run_pipeline.py, lepton_spark/errors.py): 0 done or done already,
# 2 bad input (config, data, shards: never retried, a retry would fail the same way), 3 training
# failed, 4 infrastructure, 130 interrupted. Every code but 0 and 2 is retried LEPTON_RETRIES times
# after LEPTON_RETRY_DELAY seconds; a signal to this script stops it without retrying.
#
# Environment (the DAG's names):
#   LEPTON_HOME          working directory, the repository (default: the folder above jobs/)
#   LEPTON_SPARK_SUBMIT  spark-submit (default: LEPTON_HOME/.venv/bin/spark-submit if present,
#                        else spark-submit on PATH)
#   LEPTON_SPARK_MASTER  --master (default: local[2])
#   LEPTON_SPARK_ARGS    more spark-submit options before the script, e.g. "--driver-memory 4g"
#   LEPTON_PIPELINE      pipeline YAML (default: LEPTON_HOME/pipelines/tabular_demo.yaml)
#   LEPTON_SET           space-separated k=v overrides, each passed as --set k=v (no quoting)
#   LEPTON_RETRIES       retries after the first attempt (default: 2)
#   LEPTON_RETRY_DELAY   seconds between attempts (default: 600)
#   LEPTON_LOG_DIR       log folder (default: LEPTON_HOME/.lepton/logs); one file per call,
#                        nightly-RUN_KEY-YYYYmmddTHHMMSS.log, all attempts in it
set -uo pipefail

LEPTON_HOME=${LEPTON_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [ ! -f "$LEPTON_HOME/jobs/run_pipeline.py" ]; then
  echo "nightly.sh: LEPTON_HOME=$LEPTON_HOME has no jobs/run_pipeline.py" >&2
  exit 2 # a setting to fix, not a retry
fi
cd "$LEPTON_HOME" || exit 2
RUN_KEY=${1:-$(date +%F)}
if [ -z "${LEPTON_SPARK_SUBMIT:-}" ]; then
  if [ -x .venv/bin/spark-submit ]; then
    LEPTON_SPARK_SUBMIT=$LEPTON_HOME/.venv/bin/spark-submit
  else
    LEPTON_SPARK_SUBMIT=spark-submit
  fi
fi
MASTER=${LEPTON_SPARK_MASTER:-local[2]}
PIPELINE=${LEPTON_PIPELINE:-$LEPTON_HOME/pipelines/tabular_demo.yaml}
RETRIES=${LEPTON_RETRIES:-2}
RETRY_DELAY=${LEPTON_RETRY_DELAY:-600}
LOG_DIR=${LEPTON_LOG_DIR:-$LEPTON_HOME/.lepton/logs}

# spark-submit's launcher, driver and executors run Python: the environment's own interpreter
# (the python beside spark-submit, which has lepton_spark installed), not python3 on cron's PATH.
submit_path=$(command -v "$LEPTON_SPARK_SUBMIT" || true)
if [ -n "$submit_path" ] && [ -x "$(dirname "$submit_path")/python" ]; then
  export PYSPARK_PYTHON=${PYSPARK_PYTHON:-$(dirname "$submit_path")/python}
  export PYSPARK_DRIVER_PYTHON=${PYSPARK_DRIVER_PYTHON:-$PYSPARK_PYTHON}
fi

mkdir -p "$LOG_DIR" || exit 4
LOG="$LOG_DIR/nightly-$RUN_KEY-$(date +%Y%m%dT%H%M%S).log"
say() { printf '%s nightly: %s\n' "$(date '+%F %T')" "$*" >>"$LOG"; }

# Split on spaces (the DAG also honours shell quotes; here no value may contain a space).
read -r -a spark_args <<<"${LEPTON_SPARK_ARGS:-}"
read -r -a overrides <<<"${LEPTON_SET:-}"
command=("$LEPTON_SPARK_SUBMIT" --master "$MASTER" "${spark_args[@]}" jobs/run_pipeline.py
  "$PIPELINE" --run-key "$RUN_KEY")
for kv in "${overrides[@]}"; do command+=(--set "$kv"); done

# A signal to this script (Ctrl-C, kill, a stopped cron job) goes on to spark-submit, which stops
# (exit 143, or 130 from the driver); this script then stops too instead of retrying.
# spark-submit runs in a session of its own (setsid) so that the JVM, the Python driver and the rank
# processes get the signal together, as the DAG's task does it.
setsid=()
command -v setsid >/dev/null 2>&1 && setsid=(setsid)
child=""
stopping=0
# shellcheck disable=SC2317  # called by the trap
on_signal() {
  stopping=1
  say "signal received: stopping spark-submit"
  if [ -n "$child" ]; then
    kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null
  fi
}
trap on_signal INT TERM

attempts=$((RETRIES + 1))
code=0
for ((attempt = 1; attempt <= attempts; attempt++)); do
  # Values of secret-looking key=value arguments stay out of the log.
  shown=$(printf '%s ' "${command[@]}" | sed -E 's/([^ =]*(secret|passw|pwd|token|credential|(access|account|private|api)[._-]?key)[^ =]*)=[^ ]*/\1=*********(redacted)/gI')
  say "attempt $attempt/$attempts: $shown"
  "${setsid[@]}" "${command[@]}" >>"$LOG" 2>&1 </dev/null &
  child=$!
  wait "$child"
  code=$?
  # wait returns early when a signal arrives: wait again for spark-submit's own exit code.
  while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    code=$?
  done
  child=""
  say "attempt $attempt/$attempts: exit code $code"
  if [ "$code" -eq 0 ] || [ "$code" -eq 2 ] || [ "$stopping" -eq 1 ]; then
    break
  fi
  if [ "$attempt" -lt "$attempts" ]; then
    say "retrying in ${RETRY_DELAY}s"
    sleep "$RETRY_DELAY" &
    pause=$!
    wait "$pause" # returns early on a signal: no more attempts then
    kill "$pause" 2>/dev/null
    [ "$stopping" -eq 1 ] && break
  fi
done

if [ "$code" -ne 0 ]; then
  case "$code" in
    2) why="bad input, not retried" ;;
    3) why="training failed" ;;
    4) why="infrastructure" ;;
    130) why="interrupted" ;;
    129 | 1[3-9][0-9]) why="stopped by signal $((code - 128))" ;;
    *) why="spark-submit failed" ;;
  esac
  say "failed: exit code $code ($why)"
  echo "lepton-spark nightly $RUN_KEY failed with exit code $code ($why); log: $LOG" >&2
  # The driver's own message: its last "error: ..." line and the indented lines under it.
  awk '/^error: /{msg = $0; more = 1; next} more && /^[ \t]/{msg = msg "\n" $0; next}
    {more = 0} END {if (msg) print msg}' "$LOG" >&2
else
  say "done"
fi
exit "$code"
