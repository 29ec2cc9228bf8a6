"""Flower components for medgen: only the INSTALLED apps, nothing else.

Flower imports this module from the app bundle (FAB). It deliberately contains no logic,
so the code a hospital runs is always the medgen it installed, never code shipped by the
coordinator inside the bundle (docs/architecture.md, FLOWER.md "Layout and app loading").
The ``import ... as`` form is required: ``from ... import app as server_app`` fails
``flwr run``'s component check.
"""

import medgen.client.app as _client
import medgen.server.app as _server

server_app = _server.app
client_app = _client.app
