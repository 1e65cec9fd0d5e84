#!/bin/sh
# Long sets in the background: every run to 0.064 PFLOP first, then every run on to its full budget; complete
# runs of the FINAL_SETS get their final evaluation. Default: the curves; name other sets instead
# (`sh experiments/curves_driver.sh claim4lr lrlong claim3long`: budgets <= 0.064, so the first phase finishes
# them); PHASES="0.128" runs each run to its end before the next (two drivers on one set share its runs). One torch thread. A phase that fails (a crash, or the code not importing while it is being edited) is
# started again after 5 minutes (up to 60 times) and resumes from the checkpoints in experiments/cache/ckpt/.
#   nohup sh experiments/curves_driver.sh >> experiments/cache/curves.log 2>&1 &
cd "$(dirname "$0")/.." || exit 1
[ "$#" -gt 0 ] || set -- curves
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for max in ${PHASES:-0.064 0.128}; do
  tries=0
  until python experiments/claims.py run "$@" --max-pflop "$max" --threads 1; do
    tries=$((tries + 1))
    [ "$tries" -ge 60 ] && { echo "$(date +%T) $*: giving up on phase $max after $tries failures"; exit 1; }
    echo "$(date +%T) $*: phase $max failed (try $tries), again in 300 s"
    sleep 300
  done
done
echo "$(date +%T) $*: all runs complete"
