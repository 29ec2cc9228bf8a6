"""Flower components for medgen: only the INSTALLED apps, nothing else.

Flower imports this module from the app bundle (FAB). It deliberately contains no logic,
so the code a hospital runs is always the medgen it installed, never code shipped by the
coordinator inside the bundle (docs/architecture.md, FLOWER.md "Layout and app loading").

Each Flower process reads ONE component, so each is imported only when asked for
(PEP 562 module ``__getattr__``): the per-message ClientApp process never imports the
ServerApp (torch, MONAI, the recipes; docs/deployment.md, "The warm trainer"). The
assignments are what ``flwr run``'s component check looks for (it parses this file); a
``from ... import app as server_app`` line fails that check.
"""

import importlib


def __getattr__(name: str):
    if name == "server_app":
        server_app = importlib.import_module("medgen.server.app").app
        return server_app
    if name == "client_app":
        client_app = importlib.import_module("medgen.client.app").app
        return client_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
