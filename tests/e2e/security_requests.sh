#!/usr/bin/env bash
# labels: integration security
# Security suite, part 1 (issue #11): hostile job submissions against a real
# redis-server and qcal-coordinator on loopback. Each must be refused with the
# right status and a clear message, create nothing, and (403) tell nothing of
# the files outside the roots:
#   - confinement: paths outside --allow-read / --allow-write, symlinks out,
#     relative paths, the artifact store, a root itself, a directory qcal did
#     not publish, FIFOs, schedule templates;
#   - bounded work: caps on nsamples / seqlen / labels / recipe options, an
#     eval "all" of a huge file;
#   - clear errors: corrupt safetensors headers, .u32 sizes, malformed .jsonl,
#     a config with fewer layers than the checkpoint;
#   - output ownership: a second live job on the same path is 409, also after a
#     Redis restart, and free again once the first ends;
#   - nothing poisoned: raw bytes and terminal escapes already in Redis never
#     break listing, and the CLI shows them escaped.
# Prints "requests tried N, refused correctly N; faults injected N, survived
# with nothing lost N".
source "$(dirname "$0")/lib/service.bash" "$@"
source "$(dirname "$0")/lib/security.bash"

R=$T/read W=$T/write S=$T/secret
mkdir -p "$R" "$W" "$S"
ALLOW=(--allow-read "$R" --allow-write "$W")
start_redis
start_coordinator
make_model "$R/m" small
cp -r "$R/m" "$S/m"
printf 'abcd' >"$S/private.u32"

# spec MODEL CALIB OUT [PYTHON-DICT-UPDATE]: a job spec as JSON.
spec() {
  python3 -c "
import json, sys
d = {'model': sys.argv[1], 'calib': {'path': sys.argv[2], 'nsamples': 8, 'seqlen': 64},
     'output': {'path': sys.argv[3]}}
upd = eval(sys.argv[4]) if len(sys.argv) > 4 else {}
for k, v in upd.items():
    if isinstance(v, dict) and isinstance(d.get(k), dict): d[k].update(v)
    else: d[k] = v
print(json.dumps(d))" "$@"
}
good() { spec "$R/m" "$R/m.calib.jsonl" "$W/${1:-out}" "${2:-{\}}"; }

# ---------------------------------------------------------------- confinement
refused_spec 403 "model /etc" "$(spec /etc "$R/m.calib.jsonl" "$W/o")"
refused_spec 403 "another team's model" "$(spec "$S/m" "$R/m.calib.jsonl" "$W/o")"
refused_spec 403 "a model that does not exist, outside" "$(spec "$S/nothing" "$R/m.calib.jsonl" "$W/o")"
# The two answers differ only in the path: existence does not leak.
api POST /v1/jobs --data-binary "$(spec "$S/m" "$R/m.calib.jsonl" "$W/o")"
m1=$(echo "$HTTP_BODY" | pyj 'd["error"]["message"]' | sed "s|$S/m|P|")
api POST /v1/jobs --data-binary "$(spec "$S/nothing" "$R/m.calib.jsonl" "$W/o")"
m2=$(echo "$HTTP_BODY" | pyj 'd["error"]["message"]' | sed "s|$S/nothing|P|")
[ "$m1" = "$m2" ] || fail "403 messages differ by existence: '$m1' vs '$m2'"
refused_spec 403 "another team's data" "$(spec "$R/m" "$S/private.u32" "$W/o")"
ln -s "$S/private.u32" "$R/x.u32"
refused_spec 403 "a symlink x.u32 to a private file" "$(spec "$R/m" "$R/x.u32" "$W/o")"
mkdir -p "$R/m-linked" && cp "$R/m/config.json" "$R/m-linked/"
ln -s "$S/m/model.safetensors" "$R/m-linked/model.safetensors"
refused_spec 403 "a model whose weights link outside" "$(spec "$R/m-linked" "$R/m.calib.jsonl" "$W/o")"
refused_spec 403 "output /etc/qcal" "$(good x | pyj 'dict(d, output={"path": "/etc/qcal", "overwrite": True})')"
refused_spec 403 "output / with overwrite" "$(good x | pyj 'dict(d, output={"path": "/", "overwrite": True})')"
refused_spec 403 "output = the write root" "$(good x | pyj "dict(d, output={'path': '$W', 'overwrite': True})")"
refused_spec 403 "output = the artifact store" "$(good x | pyj "dict(d, output={'path': '$STORE', 'overwrite': True})")"
refused_spec 403 "output = the Redis data directory" "$(good x | pyj "dict(d, output={'path': '$T/redis', 'overwrite': True})")"
refused_spec 403 "output = the model's parent (a read root)" "$(good x | pyj "dict(d, output={'path': '$R', 'overwrite': True})")"
mkdir -p "$W/theirs" && echo precious >"$W/theirs/notes.txt"
refused_spec 403 "overwrite of a directory qcal did not publish" \
  "$(good theirs '{"output": {"overwrite": True}}')"
[ -f "$W/theirs/notes.txt" ] || fail "the other directory was touched"
ln -s "$S" "$W/escape"
refused_spec 403 "output through a symlink out of the write root" "$(good escape/o)"
refused_spec 400 "a relative model path" "$(spec m "$R/m.calib.jsonl" "$W/o")"
refused_spec 400 "a relative output path" "$(good x | pyj 'dict(d, output={"path": "out"})')"
mkfifo "$R/fifo.jsonl"
refused_spec 400 "a FIFO as calibration data" "$(spec "$R/m" "$R/fifo.jsonl" "$W/o")"
tmpl=$(good "nightly-{time}")
refused 403 "a schedule template reading outside" POST /v1/schedules --data-binary \
  "{\"cron\": \"0 2 * * *\", \"template\": $(echo "$tmpl" | pyj "dict(d, model='$S/m')")}"

# ---------------------------------------------------------------- bounded work
refused_spec 400 "eval.nsamples near 2^62" \
  "$(good x "{'eval': {'path': '$R/m.eval.jsonl', 'nsamples': 1 << 62, 'seqlen': 64}}")"
refused_spec 400 "calib.seqlen 2^40" "$(good x '{"calib": {"seqlen": 1 << 40}}')"
refused_spec 400 "FlatQuant epochs 1e9" \
  "$(good x '{"recipe": {"method": "flatquant", "a_bits": 4, "epochs": 1000000000}}')"
refused_spec 400 "a label with terminal escapes" "$(good x '{"labels": {"team": "a\u001b[2Jb"}}')"
refused_spec 400 "100 labels" "$(good x '{"labels": {"k%d" % i: "v" for i in range(100)}}')"
truncate -s 64G "$R/huge.u32"  # sparse: 16 G tokens of id 0
refused_spec 422 "eval of all of a 64 GiB file" \
  "$(good x "{'eval': {'path': '$R/huge.u32', 'nsamples': 0, 'seqlen': 64}}")"
rm -f "$R/huge.u32"

# ---------------------------------------------------------------- clear errors
mkdir -p "$R/garbage"
cp "$R/m/config.json" "$R/garbage/"
python3 -c "import struct,sys; open(sys.argv[1],'wb').write(struct.pack('<Q', 64) + b'\xff' * 64)" \
  "$R/garbage/model.safetensors"
refused_spec 400 "a safetensors header of 0xFF bytes" "$(spec "$R/garbage" "$R/m.calib.jsonl" "$W/o")"
echo "$HTTP_BODY" | grep -q "garbage/model.safetensors" || fail "the error does not name the file: $HTTP_BODY"
python3 -c "import sys; open(sys.argv[1],'wb').write(b'\x01\x00\x00\x00' * 100 + b'\x01')" "$R/odd.u32"
refused_spec 400 "a .u32 of 401 bytes" "$(spec "$R/m" "$R/odd.u32" "$W/o")"
echo "$HTTP_BODY" | grep -q "not a multiple of 4" || fail "no clear .u32 error: $HTTP_BODY"
printf '{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5]}\n{"input_ids": [1, 2\n' >"$R/broken.jsonl"
refused_spec 400 "malformed JSON on line 3" "$(spec "$R/m" "$R/broken.jsonl" "$W/o")"
echo "$HTTP_BODY" | grep -q "broken.jsonl:3: malformed JSON" || fail "no line number: $HTTP_BODY"
mkdir -p "$R/fewer"
cp "$R/m/model.safetensors" "$R/fewer/"
python3 -c "import json,sys; c=json.load(open(sys.argv[1])); c['num_hidden_layers']=1; json.dump(c, open(sys.argv[2],'w'))" \
  "$R/m/config.json" "$R/fewer/config.json"
refused_spec 400 "a config with fewer layers than the checkpoint" "$(spec "$R/fewer" "$R/m.calib.jsonl" "$W/o")"
echo "$HTTP_BODY" | grep -q "holds layer 1" || fail "unclear layer mismatch: $HTTP_BODY"

# ---------------------------------------------------------------- output ownership
api POST /v1/jobs --data-binary "$(good shared)"
[ "$HTTP_CODE" = 202 ] || fail "the first job: HTTP $HTTP_CODE $HTTP_BODY"
first=$(echo "$HTTP_BODY" | pyj 'd["id"]')
refused_spec 409 "a second live job on the same output" "$(good shared '{"output": {"overwrite": True}}')"
refused_spec 409 "the same output through ./ and a trailing /" "$(good ./shared/)"
stop_redis
start_redis
wait_until 20 "the coordinator back on Redis" bash -c "curl -sf -o /dev/null -H 'Authorization: Bearer $TOKEN' $URL/v1/jobs"
refused_spec 409 "the same output after a Redis restart" "$(good shared)"
api DELETE "/v1/jobs/$first"
[ "$HTTP_CODE" = 200 ] || fail "cancel: HTTP $HTTP_CODE $HTTP_BODY"
api POST /v1/jobs --data-binary "$(good shared)"
[ "$HTTP_CODE" = 202 ] || fail "the path was not released by the cancel: HTTP $HTTP_CODE $HTTP_BODY"
second=$(echo "$HTTP_BODY" | pyj 'd["id"]')

# ---------------------------------------------------------------- nothing poisoned
# What older versions stored: raw 0xFF bytes in an error, escapes in a label.
redis-cli -p "$REDIS_PORT" HSET "qcal:job:$first" error "$(printf 'bad header: \xff\xff\xfe')" \
  labels "$(printf '{"team": "a\\u001b]0;pwned\\u0007b"}')" >/dev/null
redis-cli -p "$REDIS_PORT" RPUSH "qcal:job:$first:log" "$(printf 'raw \xff\x1b[2J')" >/dev/null
for p in "/v1/jobs" "/v1/jobs?state=cancelled" "/v1/jobs/$first" "/v1/jobs/$first/logs"; do
  api GET "$p"
  [ "$HTTP_CODE" = 200 ] || fail "GET $p after raw bytes were stored: HTTP $HTTP_CODE $HTTP_BODY"
done
echo "$HTTP_BODY" | grep -q 'raw \\\\xFF' || fail "the raw byte is not shown escaped: $HTTP_BODY"
out=$(q jobs 2>&1)
case $out in *$'\e'* | *$'\a'*) fail "qcal jobs printed terminal control bytes" ;; esac
echo "$out" | grep -q 'a\\x1B\]0;pwned\\x07b' || fail "qcal jobs does not show the label escaped: $out"
out=$(q logs "$first" 2>&1)
case $out in *$'\e'*) fail "qcal logs printed an escape byte" ;; esac
out=$(q status "$first" 2>&1)
echo "$out" | grep -q 'bad header: \\xFF\\xFF\\xFE' || fail "qcal status: $out"
note "poisoned data is listed: $(echo "$out" | grep error)"

api DELETE "/v1/jobs/$second"
security_summary
passed "hostile submissions refused with the right status; nothing created, nothing leaked"
