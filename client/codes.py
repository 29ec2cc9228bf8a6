"""The error codes a node answers with (Flower's own codes stop at 8; ours are recognisable).

One table for the per-message ClientApp (client/app.py), the round functions
(client/rounds.py) and the warm trainer's channel (client/worker_channel.py); the
allow-list's refusal (deploy/allowlist.py, 4003) and the message audit's (4011) live with
their checks.
"""

BUDGET_EXCEEDED = 4001
TRAINING_FAILED = 4002
SITE_DATA_REFUSED = 4003  # the recipe cannot train on this site's data (e.g. no label maps)
EVALUATION_FAILED = 4004
