"""`edgeloop keys`: the release signing key pair."""

from __future__ import annotations

from pathlib import Path

import click

from edgeloop.artifacts.signing import generate_keypair
from edgeloop.core.settings import edgeloop_home


def default_key_dir() -> Path:
    return edgeloop_home() / "keys"


@click.group()
def keys() -> None:
    """Manage the ed25519 key pair that signs model releases."""


@keys.command("init")
@click.option(
    "--dir",
    "key_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write release.key (0600) and release.pub [$EDGELOOP_HOME/keys].",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing key (devices must get the new"
    " public key, or they will refuse every later release).",
)
def init(key_dir: Path | None, force: bool) -> None:
    """Generate the signing key pair. The private key never goes into a release."""
    priv, pub = generate_keypair(key_dir or default_key_dir(), overwrite=force)
    click.echo(f"private key: {priv} (mode 0600; keep it on the trainer only)")
    click.echo(f"public key:  {pub} (install on devices)")
