#!/usr/bin/env bash
# labels: integration
# Service scenario (g): a finished task's artifact is corrupted in the store
# before its consumer runs. The consumer's checksum check catches it, the
# producer is re-run, and the job succeeds with output byte-identical to
# `qcal quantize`. Two cases:
#   1. quantize-0000's artifacts get bytes flipped (sizes unchanged);
#   2. the embed artifact is truncated and quantize-0000's flipped, so the
#      re-run of quantize-0000 itself finds its input corrupt (a chain).
# Workers started with --once each run exactly one task, which lets the test
# step between tasks.
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator
make_model "$T/m" small
R=(--model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 32 --seqlen 128 --method gptq --w-bits 4
  --group-size 64)
"$QCAL" quantize "${R[@]}" --out "$T/ref" --quiet >/dev/null

task_state() {  # task_state JOB TASK
  job_json "$1" | pyj "[t['state'] for t in d['progress']['tasks'] if t['id'] == '$2'][0]"
}
run_one() {  # run_one JOB TASK: one --once worker, which must finish TASK
  local name=once-$RANDOM
  start_worker "$name" --once
  wait_until 120 "worker $name (--once) to exit" eval '! worker_alive '"$name"
  wait "${WPID[$name]}" || fail "worker $name exited $?"
  unset "WPID[$name]"
  [ "$(task_state "$1" "$2")" = "done" ] || fail "after one --once worker, $2 is $(task_state "$1" "$2")"
}
flip_bytes() {  # flip_bytes FILE: invert 16 bytes in the middle, size unchanged
  python3 - "$1" <<'PY'
import os, sys
p = sys.argv[1]
n = os.path.getsize(p)
with open(p, "r+b") as f:
    f.seek(n // 2)
    b = f.read(16)
    f.seek(n // 2)
    f.write(bytes(x ^ 0xFF for x in b))
PY
}
artifacts() {  # artifacts JOB TASK: the files of the task's first attempt
  find "$STORE/jobs/$1/$2" -type f | sort
}

for case in 1 2; do
  id=$(q submit "${R[@]}" --out "$T/out$case" --eval-data "$T/m.eval.jsonl" --eval-nsamples 8)
  note "case $case: submitted $id"
  run_one "$id" embed
  run_one "$id" quantize-0000
  files=$(artifacts "$id" quantize-0000)
  [ -n "$files" ] || fail "no artifacts under $STORE/jobs/$id/quantize-0000 (store layout changed?)"
  for f in $files; do flip_bytes "$f"; note "flipped 16 bytes in ${f#"$STORE"/}"; done
  if [ $case = 2 ]; then
    for f in $(artifacts "$id" embed); do
      truncate -s $(($(stat -c %s "$f") / 2)) "$f"
      note "truncated ${f#"$STORE"/}"
    done
  fi
  start_worker "w$case"
  wait_job "$id" succeeded 300
  kill_worker "w$case"
  compare_dirs "$T/ref" "$T/out$case"
  j=$(job_json "$id")
  echo "$j" | python3 -c "
import json, sys
d = json.load(sys.stdin)
t = {t['id']: t for t in d['progress']['tasks']}
assert t['quantize-0000']['attempts'] >= 2, t['quantize-0000']
if $case == 2:
    assert t['embed']['attempts'] >= 2, t['embed']
print('attempts:', {k: v['attempts'] for k, v in t.items()})
" || fail "case $case: the corrupt artifacts were not re-made: $j"
  q logs "$id" | grep -i -E "corrupt|checksum|sha|mismatch" | head -3 ||
    note "(the job log does not mention the corruption)"
done
passed "corrupted artifacts detected, producers re-run, output identical"
