#!/usr/bin/env bash
# The coordinator's machine in a federation across SEPARATE hosts (one command block per
# step; run them by hand the first time). Assumes `medgen` is installed (pip install medgen
# or the container in deploy/Dockerfile) and that hospitals reach $SERVER_NAME:$PORT.
set -euo pipefail
SERVER_NAME=${SERVER_NAME:-fl.example-hospital-network.org}
SERVER_IP=${SERVER_IP:-10.0.0.5}
PORT=${PORT:-9092}

# 1. once: the federation CA (keep pki/ca/ca.key OFFLINE after this) and the server certificate
medgen-server pki ca --out pki/ca --cn "Brain MRI federation CA"
medgen-server pki server-cert --ca pki/ca --out pki/server --host "$SERVER_NAME" --host "$SERVER_IP"
#    send pki/ca/ca.crt (public) to every hospital together with "$SERVER_NAME:$PORT"

# 2. the SuperLink, in the foreground (a systemd unit or the container runs this)
medgen-server start --certs pki/server --ca pki/ca/ca.crt --state /var/lib/medgen-server --port "$PORT" &

# 3. per hospital, when its public key arrives (site-a.pub, sent by the hospital)
medgen-server register-node site-a.pub --state /var/lib/medgen-server

# 4. a training run (re-run the same command after a server restart: it resumes)
medgen-server run --config run.toml --state /var/lib/medgen-server --out runs/federation
