#!/usr/bin/env bash
# One call on the lent GPU machine: stages in order inside one time budget, each stage's log and the
# results written to $OUT as soon as it ends, so a call cut short still returns everything that finished.
#
#   source scripts/gpu_env.sh || exit 1
#   bash scripts/gpu_session.sh 540 bench=transformer chapters=05_attention,07_transformer tests=test_attention
#
# The first argument is the budget in seconds for all stages together (leave the call's own limit some
# margin: packing the results takes a few seconds). Stages:
#   bench=FAMILY[,FAMILY]     python benchmarks/run.py FAMILY ...   (rows appended case by case)
#   chapters=NB[,NB]          scripts/execute_notebooks.py book/NB.ipynb ... --budget (what is left)
#   tests=FILE[,FILE]         pytest tests/FILE.py ...   (tests=all: the whole suite)
#   profile=B,T,D,L,V         benchmarks/profile_step.py --shape B T D L V --providers triton
#   train=ARGS                python train.py ARGS (commas become spaces), e.g. train=--bench,--steps,2000
#   py=SCRIPT,ARGS            python SCRIPT ARGS (a probe of the moment)
#   scaling=N[,N]             bash scripts/scaling.sh N ...   (data-parallel runs on a machine with N GPUs)
# Each stage gets the time left until the budget's end; none starts with less than 20 s left.
# Logs: $OUT/<n>-<stage>.log. Results: $OUT/<gpu>.jsonl and $OUT/train_logs.tgz (three folders deep
# would not come back as files).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder whose files come back}"
end=$(( $(date +%s) + ${1:?budget in seconds} ))
shift
n=0
for stage in "$@"; do
    n=$((n + 1))
    name=${stage%%=*}
    arg=${stage#*=}
    items=${arg//,/ }
    left=$(( end - $(date +%s) ))
    log="$OUT/$n-$name.log"
    if (( left < 20 )); then
        echo "skipped: $left s left" > "$log"
        continue
    fi
    case $name in
        bench) cmd=(python3 benchmarks/run.py $items) ;;
        chapters) cmd=(python3 scripts/execute_notebooks.py --out "$OUT" --budget $(( left - 10 ))
                       $(for nb in $items; do echo "book/$nb.ipynb"; done)) ;;
        # four test processes share the GPU when pytest-xdist was carried: the suite is mostly compiling
        tests) workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
               [[ $items == all ]] && cmd=(python3 -m pytest -q -rfE --durations=15 $workers tests) ||
               cmd=(python3 -m pytest -q -rfE --durations=15 $workers
                    $(for t in $items; do echo "tests/$t.py"; done)) ;;
        py) cmd=(python3 $items) ;;
        profile) cmd=(python3 benchmarks/profile_step.py --shape $items --providers triton) ;;
        train) cmd=(python3 train.py $items) ;;
        scaling) cmd=(bash scripts/scaling.sh $items) ;;
        *) echo "unknown stage $name" > "$log"; continue ;;
    esac
    echo "== ${cmd[*]} (budget ${left}s)" > "$log"
    start=$(date +%s)
    # no pipe after the command: a process that outlives it (a Jupyter kernel) would hold the pipe open
    timeout -k 5 "$left" "${cmd[@]}" >> "$log" 2>&1
    echo "== exit $? after $(( $(date +%s) - start ))s" >> "$log"
done
cp benchmarks/results/*.jsonl "$OUT/" 2>/dev/null
[[ -d benchmarks/results/train_logs ]] && tar czf "$OUT/train_logs.tgz" benchmarks/results/train_logs
exit 0
