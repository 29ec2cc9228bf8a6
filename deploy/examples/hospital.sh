#!/usr/bin/env bash
# A hospital's machine in a federation across SEPARATE hosts. Assumes `medgen` is
# installed (the release named in allow.toml) and the coordinator sent ca.crt and the
# server address. Nothing here ever leaves the machine except the .pub key (step 1) and,
# during training, model weights and aggregate numbers.
set -euo pipefail
SITE=${SITE:-A}
SERVER=${SERVER:-fl.example-hospital-network.org:9092}

# 1. once: this hospital's key pair; send ONLY keys/site-$SITE.pub to the coordinator
medgen-server pki node-key --out keys --name "site-$SITE"

# 2. check the data the node will read (read-only; nothing is modified)
medgen-client data check /data/mri-export

# 3. the node (foreground; a systemd unit or the container runs this). The epsilon cap
#    and the allow-list are the hospital's: the coordinator cannot loosen them. The node
#    runs the warm trainer beside the SuperNode (a 0600 socket in --state, which must not
#    be writable by other users); `--trainer cold` trains each round in its own process
#    (docs/deployment.md "The warm trainer", docs/security.md).
medgen-client --server "$SERVER" --ca ca.crt --key "keys/site-$SITE" --site "$SITE" \
  --data /data/mri-export --public /data/medgen-public --state /var/lib/medgen \
  --epsilon-cap 4.0 --allow allow.toml --trainer warm
