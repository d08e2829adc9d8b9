"""The ``fleet`` command line.

Subcommands load lazily: ``fleet --help`` and the producer-side commands never import torch; only the
subcommands that run workers or train models import ``workers``.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

#: subcommand -> "module:attribute" of its click command.
_COMMANDS: dict[str, str] = {
    "up": "producer_api.cli.up:up",
    "api": "producer_api.cli.serve:api",
    "worker": "producer_api.cli.pools:worker",
    "flower": "producer_api.cli.pools:flower",
    "models": "producer_api.cli.models:models",
    "predict": "producer_api.cli.jobs:predict",
    "jobs": "producer_api.cli.jobs:jobs",
    "stats": "producer_api.cli.jobs:stats",
    "keys": "producer_api.cli.keys:keys",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when they run (or when help lists them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="finsight-fleet")
def cli() -> None:
    """FinSight Fleet: async inference jobs for forecasters and sentiment models on Celery + Redis."""


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="fleet")
