#!/usr/bin/env bash
# A 3-hospital federation on ONE host, on the simulated data (real processes, TLS, auth).
# Everything lives under $WORK; every process started here is stopped by PID on exit.
#   bash deploy/examples/one-host.sh [WORK_DIR]
set -euo pipefail
WORK=${1:-fed-demo}
PORT=${PORT:-9092}
mkdir -p "$WORK/logs"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT

# data: three simulated hospitals (A, B, C) and a public anatomy bank
python -m medgen.sim.cli build --out "$WORK/data" --sites A,B,C --subjects-per-site 50 --image-size 64

# coordinator: CA, server certificate, SuperLink
medgen-server pki ca --out "$WORK/pki/ca"
medgen-server pki server-cert --ca "$WORK/pki/ca" --out "$WORK/pki/server" --host localhost --host 127.0.0.1
medgen-server start --certs "$WORK/pki/server" --ca "$WORK/pki/ca/ca.crt" --state "$WORK/server-state" \
  --host 127.0.0.1 --port "$PORT" > "$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)
sleep 10

# hospitals: a key each, registered by the coordinator, then a node each (own local port)
i=0
for SITE in A B C; do
  medgen-server pki node-key --out "$WORK/keys" --name "site-$SITE"
  medgen-server register-node "$WORK/keys/site-$SITE.pub" --state "$WORK/server-state"
  medgen-client --server "127.0.0.1:$PORT" --ca "$WORK/pki/ca/ca.crt" --key "$WORK/keys/site-$SITE" \
    --site "$SITE" --data "$WORK/data/sites/$SITE" --public "$WORK/data/public" \
    --state "$WORK/hospitals/$SITE" --port $((9094 + i)) > "$WORK/logs/node-$SITE.log" 2>&1 &
  PIDS+=($!)
  i=$((i + 1))
done

# one training run (the example config, with the evaluation on the coordinator's held-out data)
medgen-server run --config "$(dirname "$0")/run.toml" --state "$WORK/server-state" \
  --set num-rounds=3 --set eval-every=1 --set "data-root=\"$WORK/data\"" --out "$WORK/run"
