#!/usr/bin/env bash
# labels: integration
# Service scenario (a): jobs submitted over REST (qcal submit, flags and a
# spec file) produce checkpoints byte-identical to `qcal quantize` in process
# with the same recipe — every file compared with cmp. Also drives the client
# commands a user runs (status, wait, jobs --label, logs, report) and a job
# whose validation gate fails (state failed, `qcal wait` exit 1, report kept).
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator
start_worker w1
make_model "$T/m" small
R=(--model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 32 --seqlen 128)
E=(--eval-data "$T/m.eval.jsonl" --eval-nsamples 8)

# 1: GPTQ W4 g64 sym, GPTQ format, from flags.
F1=(--method gptq --w-bits 4 --group-size 64)
id1=$(q submit "${R[@]}" "${F1[@]}" --out "$T/out1" "${E[@]}" --max-ppl-increase 1 --max-kl 1 \
  --labels suite=a,case=1)
note "submitted $id1"
# 2: asym + act-order + static groups, compressed-tensors, from a spec file.
F2=(--method gptq --w-bits 4 --group-size 64 --asym --act-order --static-groups --format compressed-tensors)
q submit "${R[@]}" "${F2[@]}" --out "$T/out2" --labels suite=a,case=2 --dry-run >"$T/spec2.json"
id2=$(q submit --spec "$T/spec2.json")
note "submitted $id2 from $T/spec2.json"
# 3: RTN W8 per channel, high priority.
F3=(--method rtn --w-bits 8 --group-size -1)
id3=$(q submit "${R[@]}" "${F3[@]}" --out "$T/out3" --priority high --labels suite=a,case=3)
# 4: a gate no model passes (KL is never below 0): the job must fail with its report.
id4=$(q submit "${R[@]}" "${F1[@]}" --out "$T/out4" "${E[@]}" --max-kl 0 --labels suite=a,case=4)

# The in-process references, meanwhile.
"$QCAL" quantize "${R[@]}" "${F1[@]}" --out "$T/ref1" --quiet >/dev/null
"$QCAL" quantize "${R[@]}" "${F2[@]}" --out "$T/ref2" --quiet >/dev/null
"$QCAL" quantize "${R[@]}" "${F3[@]}" --out "$T/ref3" --quiet >/dev/null

# wait, non-terminal stderr: plain progress lines, then the summary; exit 0.
q wait "$id1" --interval 0.3 --timeout 300 >"$T/wait1.out" 2>"$T/wait1.err" ||
  fail "qcal wait $id1 exited $? ($(cat "$T/wait1.err"))"
grep -q "succeeded" "$T/wait1.out" || fail "wait summary: $(cat "$T/wait1.out")"
grep -q "$id1 .*tasks" "$T/wait1.err" || fail "no progress lines from qcal wait: $(cat "$T/wait1.err")"
grep -q "report: .*kl" "$T/wait1.out" || fail "wait printed no report: $(cat "$T/wait1.out")"
[ "$(q wait "$id2" --json --timeout 300 2>/dev/null | pyj 'd["state"]')" = succeeded ] ||
  fail "job $id2 did not succeed"
q wait "$id3" --quiet --timeout 300 >/dev/null || fail "job $id3 did not succeed"
set +e
q wait "$id4" --timeout 300 >"$T/wait4.out" 2>"$T/wait4.err"
rc=$?
set -e
[ $rc -eq 1 ] || fail "qcal wait on a gate-failed job exited $rc, expected 1"
grep -q "$id4 failed" "$T/wait4.err" || fail "wait on $id4: $(cat "$T/wait4.err")"

compare_dirs "$T/ref1" "$T/out1"
compare_dirs "$T/ref2" "$T/out2"
compare_dirs "$T/ref3" "$T/out3"

# The job views a user sees.
j1=$(job_json "$id1")
echo "$j1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
p = d["progress"]
assert d["state"] == "succeeded", d["state"]
assert p["tasks_done"] == p["tasks_total"] == len(p["tasks"]) == 5, p   # embed, 2 x quantize, assemble, validate
assert [t["type"] for t in p["tasks"]] == ["embed", "quantize", "quantize", "assemble", "validate"], p["tasks"]
assert len(d["blocks"]) == 2 and all("rel_output_error" in b for b in d["blocks"]), d["blocks"]
assert d["labels"] == {"suite": "a", "case": "1"}, d["labels"]
r = d["report"]
assert r and r.get("kl", -1) >= 0 and r.get("ppl", 0) > 0, r
' || fail "job view of $id1: $j1"
q status "$id1" | grep -q "^state *succeeded (5/5 tasks" || fail "qcal status: $(q status "$id1")"
[ "$(q jobs --label suite=a --json | pyj 'len(d["jobs"])')" = 4 ] || fail "jobs --label suite=a"
[ "$(q jobs --label suite=a,case=2 --json | pyj '[j["id"] for j in d["jobs"]]')" = "[\"$id2\"]" ] ||
  fail "jobs --label suite=a,case=2: $(q jobs --label suite=a,case=2 --json)"
[ "$(q jobs --state failed --json | pyj '[j["id"] for j in d["jobs"]]')" = "[\"$id4\"]" ] ||
  fail "jobs --state failed: $(q jobs --state failed --json)"
q jobs | grep -q "$id3 *succeeded" || fail "qcal jobs table: $(q jobs)"
nlog=$(q logs "$id1" | wc -l)
[ "$nlog" -gt 2 ] || fail "qcal logs $id1 printed $nlog lines"
[ "$(q logs "$id1" --from 2 | wc -l)" = $((nlog - 2)) ] || fail "qcal logs --from 2"
[ "$(q logs "$id1" --follow | wc -l)" = "$nlog" ] || fail "qcal logs --follow on a finished job"
q report "$id1" --json | pyj 'd["kl"]' >/dev/null || fail "qcal report $id1"
r4=$(job_json "$id4")
[ "$(echo "$r4" | pyj 'd["state"] == "failed" and d["report"] is not None')" = true ] ||
  fail "gate-failed job $id4: $r4"
note "gate-failed job: $(echo "$r4" | pyj 'd["error"]')"

# Client errors against a live server: unknown job (404 → exit 2), cancel of a
# finished job (409 → exit 2), message with the HTTP status.
set +e
out=$(q status j-does-not-exist 2>&1); rc=$?
set -e
[ $rc -eq 2 ] && echo "$out" | grep -q "qcal status: error: .*(HTTP 404)" || fail "status of unknown job: rc $rc: $out"
set +e
out=$(q cancel "$id1" 2>&1); rc=$?
set -e
[ $rc -eq 2 ] && echo "$out" | grep -q "(HTTP 409)" || fail "cancel of a finished job: rc $rc: $out"
# Schedules through the client: create (a spec file as the template), list,
# get, delete; a deleted schedule is a 404 (exit 2).
q submit "${R[@]}" "${F1[@]}" --out "$T/nightly-{time}" --dry-run >"$T/nightly.json"
sid=$(q schedules create --cron "0 3 * * *" --spec "$T/nightly.json" --max-ppl-regression 0.05 \
  --max-kl-regression 0.01)
q schedules list | grep -q "^$sid  *0 3 \* \* \* " || fail "schedules list: $(q schedules list)"
q schedules get "$sid" | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["cron"] == "0 3 * * *", d
assert d["thresholds"] == {"max_ppl_regression": 0.05, "max_kl_regression": 0.01}, d
assert d["template"]["output"]["path"].endswith("nightly-{time}"), d
' || fail "schedules get $sid: $(q schedules get "$sid")"
q schedules delete "$sid" | grep -q "schedule $sid deleted" || fail "schedules delete"
set +e
out=$(q schedules get "$sid" 2>&1); rc=$?
set -e
[ $rc -eq 2 ] && echo "$out" | grep -q "(HTTP 404)" || fail "get of a deleted schedule: rc $rc: $out"
passed "3 jobs byte-identical to qcal quantize, gate failure reported, client commands"
