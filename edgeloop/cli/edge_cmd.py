"""`edgeloop edge`: run one device daemon, or a simulated fleet in one process.

Imports only the edge extra (no torch, no Faust, no aiokafka); the simulator asks the
development PKI (`edgeloop.infra.pki`, cryptography only) for device certificates.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import click

from edgeloop.cli.fixes import require_key
from edgeloop.core.errors import ConfigError
from edgeloop.core.settings import MqttSettings, edgeloop_home

# Where a device's release public key comes from when this host holds none.
PUBKEY_ELSEWHERE = "pass --pubkey with the trainer's release.pub"


def _common(fn: Any) -> Any:
    options = [
        click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                     help="Outbox, applied versions, model slots [$EDGELOOP_HOME/edge/<id>]."),
        click.option("--model", "initial_model", type=click.Path(path_type=Path, exists=True),
                     default=None, help="Signed artifact dir to start with (first boot)."),
        click.option("--pubkey", type=click.Path(path_type=Path), default=None,
                     help="Release public key [$EDGELOOP_HOME/keys/release.pub]."),
        click.option("--cohort", default=None, help="Cohort [default]."),
        click.option("--tau", type=float, default=None, help="Threshold until the cloud sets one."),
        click.option("--confidence", type=click.Choice(["max_prob", "margin", "entropy"]),
                     default=None),
        click.option("--audit-rate", type=float, default=None),
        click.option("--rate", type=float, default=5.0, show_default=True,
                     help="Frames per second from the source."),
        click.option("--max-events", type=int, default=None,
                     help="Stop producing after this many inference events (lifetime)."),
        click.option("--exit-when-drained", is_flag=True,
                     help="Exit once the source is done and every event is acknowledged."),
        click.option("--metrics-port", type=int, default=None),
        click.option("--uplink-capacity", "uplink_capacity_bytes_per_s", type=float,
                     default=None, help="Bytes/s the device's uplink can carry, reported in "
                     "DeviceStatus: the controller lets offloads use a share of it "
                     "[undeclared: no per-device uplink limit]."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_task_images(seed: int = 0) -> tuple[Any, Any]:
    """The shipped task's images, shuffled (scikit-learn: a simulator host, not a Pi)."""
    import numpy as np

    from edgeloop.tasks.digits import load_raw

    try:
        images, labels = load_raw()
    except ImportError as exc:
        raise ConfigError(
            "digits frames come from scikit-learn's load_digits: pip install scikit-learn, "
            "or pass --source dir:PATH with .npy frames"
        ) from exc
    order = np.random.default_rng(seed).permutation(len(labels))
    return images[order], labels[order]


def _overrides(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


@click.group()
def edge() -> None:
    """Run a device daemon or a simulated fleet."""


@edge.command()
@click.option("--device-id", required=True, help="Must be the CN of the device certificate.")
@click.option("--cert", type=click.Path(path_type=Path), default=None,
              help="Client certificate [$EDGELOOP_PKI_DIR/devices/<id>.crt].")  # fmt: skip
@click.option("--key", type=click.Path(path_type=Path), default=None)
@click.option("--ca", type=click.Path(path_type=Path), default=None)
@click.option(
    "--source",
    default="digits",
    show_default=True,
    help="digits (the task's images, looped; needs scikit-learn) or dir:PATH (*.npy frames).",
)
@click.option("--drift", type=float, default=0.0, show_default=True,
              help="Drift severity applied to digits frames (0..1).")  # fmt: skip
@_common
def run(*, device_id: str, cert: Path | None, key: Path | None, ca: Path | None, source: str,
        drift: float, state_dir: Path | None, initial_model: Path | None, pubkey: Path | None,
        rate: float, metrics_port: int | None, **kw: Any) -> None:  # fmt: skip
    """Run one device: infer, decide, store, publish; apply thresholds and models."""
    from edgeloop.core.metrics import serve_metrics
    from edgeloop.core.runner import run_services
    from edgeloop.edge.daemon import EdgeDaemon, Endpoint, device_tls
    from edgeloop.edge.metrics import EdgeMetrics
    from edgeloop.edge.settings import EdgeSettings
    from edgeloop.edge.source import ArraySource, DirectorySource, FrameSource

    home = edgeloop_home()
    mqtt: MqttSettings = MqttSettings.load(home)
    if cert is None or key is None:
        if mqtt.pki_dir is None:
            raise ConfigError(
                "no device certificate: pass --cert/--key or run `edgeloop infra up` first"
            )
        cert = cert or mqtt.pki_dir / "devices" / f"{device_id}.crt"
        key = key or mqtt.pki_dir / "devices" / f"{device_id}.key"
    ca = ca or mqtt.ca_file or (mqtt.pki_dir / "ca.crt" if mqtt.pki_dir else None)
    if ca is None:
        raise ConfigError("no CA certificate: pass --ca or run `edgeloop infra up` first")
    for what, path in (("certificate", cert), ("key", key), ("CA", ca)):
        if not path.exists():
            raise ConfigError(
                f"device {what} {path} does not exist: issue one from the development CA "
                f"with `edgeloop edge enroll {device_id}` (or pass --cert/--key/--ca from "
                "your own CA)"
            )
    settings = EdgeSettings.load(
        home,
        device_id=device_id,
        state_dir=state_dir or home / "edge" / device_id,
        pubkey=pubkey or home / "keys" / "release.pub",
        **_overrides(initial_model=initial_model, metrics_port=metrics_port, **kw),
    )
    if settings.pubkey is not None:
        # Checked here: inside the daemon a missing key is a crash after start-up.
        require_key(settings.pubkey, PUBKEY_ELSEWHERE)
    frames: FrameSource
    if source.startswith("dir:"):
        frames = DirectorySource(Path(source[4:]), rate_hz=rate)
    elif source == "digits":
        from edgeloop.edge.simulator import Drifter, DriftSchedule, DriftStep

        images, labels = load_task_images()
        schedule = DriftSchedule({settings.cohort: (DriftStep(0.0, drift),)})
        frames = ArraySource(
            images, labels=labels, rate_hz=rate, transform=Drifter(schedule, settings.cohort, 0)
        )
    else:
        raise ConfigError(f"--source {source!r}: use digits or dir:PATH")
    metrics = EdgeMetrics()
    from edgeloop.tasks.digits import DigitsTask

    try:
        tls = device_tls(cert, key, ca)
    except ssl.SSLError as exc:
        # Files that exist but hold no usable PEM (a release key passed as --ca, a cert
        # from another CA's key): name all three and where good ones come from.
        raise ConfigError(
            f"cannot use --cert {cert} / --key {key} / --ca {ca}: {exc.reason or exc}; "
            f"issue a matching set with `edgeloop edge enroll {device_id}`"
        ) from exc
    daemon = EdgeDaemon(
        settings, Endpoint(mqtt.host, mqtt.tls_port, tls), frames, DigitsTask(), metrics=metrics
    )

    async def main() -> None:
        if settings.metrics_port is None:
            await run_services([daemon])
            return
        async with serve_metrics(metrics.registry, port=settings.metrics_port):
            await run_services([daemon])

    asyncio.run(main())


@edge.command()
@click.option("--devices", "-n", type=int, default=10, show_default=True)
@click.option("--prefix", default="sim", show_default=True, help="Device ids: <prefix>-0000...")
@click.option("--cohorts", default="default", show_default=True, help="Comma-separated.")
@click.option("--drift-schedule", multiple=True,
              help="cohort:at_s=severity[,at_s=severity]; repeatable. at_s counts "
                   "from each device's first frame.")  # fmt: skip
@click.option("--partition-at", type=float, default=None, help="Drop every connection at S s...")
@click.option("--partition-for", type=float, default=10.0, show_default=True, help="...for S s.")
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="On SIGINT/SIGTERM: seconds to stop taking frames and deliver every "
                   "outbox before exiting (what is left stays on disk).")  # fmt: skip
@click.option(
    "--summary",
    "summary_path",
    type=click.Path(path_type=Path),
    default=None,
    help="At exit, write per device: cohort, events produced, outbox depth (JSON).",
)
@_common
def simulate(*, devices: int, prefix: str, cohorts: str, drift_schedule: tuple[str, ...],
             partition_at: float | None, partition_for: float, latency_ms: float,
             drain_timeout: float, summary_path: Path | None,
             state_dir: Path | None, initial_model: Path | None, pubkey: Path | None,
             rate: float, max_events: int | None, metrics_port: int | None,
             **kw: Any) -> None:  # fmt: skip
    """N devices in one process, each with its own certificate, client, outbox and seq."""
    from edgeloop.core.metrics import serve_metrics
    from edgeloop.core.runner import run_services
    from edgeloop.edge.daemon import device_tls
    from edgeloop.edge.metrics import EdgeMetrics
    from edgeloop.edge.settings import EdgeSettings
    from edgeloop.edge.simulator import DriftSchedule, FleetPlan, FleetSimulator
    from edgeloop.infra.pki import DevPki
    from edgeloop.tasks.digits import DigitsTask

    home = edgeloop_home()
    mqtt: MqttSettings = MqttSettings.load(home)
    if mqtt.pki_dir is None:
        raise ConfigError("the simulator issues device certificates from the dev PKI: "
                          "run `edgeloop infra up` first (EDGELOOP_PKI_DIR)")  # fmt: skip
    pki = DevPki(mqtt.pki_dir)

    def tls_for(device_id: str) -> Any:
        creds = pki.device_cert(device_id)
        return device_tls(creds.cert, creds.key, creds.ca)

    base = EdgeSettings.load(
        home,
        device_id=f"{prefix}-base",
        state_dir=state_dir or home / "edge-sim",
        pubkey=pubkey or home / "keys" / "release.pub",
        **_overrides(initial_model=initial_model, **kw),
    )
    if base.pubkey is not None:
        # Checked here: inside the simulator each device crashes on it after start-up.
        require_key(base.pubkey, PUBKEY_ELSEWHERE)
    plan = FleetPlan(
        devices=devices,
        prefix=prefix,
        cohorts=tuple(c for c in cohorts.split(",") if c),
        rate_hz=rate,
        schedule=DriftSchedule.parse(list(drift_schedule)),
        partition_at_s=partition_at,
        partition_for_s=partition_for,
        latency_s=latency_ms / 1000.0,
        events_per_device=max_events,
    )
    images, labels = load_task_images()
    metrics = EdgeMetrics()
    sim = FleetSimulator(
        plan, base, host=mqtt.host, port=mqtt.tls_port, tls_for=tls_for, images=images,
        task=DigitsTask(), labels=labels, metrics=metrics,
    )  # fmt: skip

    def write_summary() -> None:
        # Only after a clean stop: a drain that overran its deadline ends the process
        # (the runner's forced exit) without one, which a reader takes as "not drained".
        if summary_path is not None:
            summary_path.parent.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps(sim.summary(), indent=1, sort_keys=True))

    async def main() -> None:
        if metrics_port is None:
            await run_services([sim], shutdown_timeout_s=drain_timeout)
        else:
            async with serve_metrics(metrics.registry, port=metrics_port):
                await run_services([sim], shutdown_timeout_s=drain_timeout)
        write_summary()

    asyncio.run(main())
    click.echo(f"simulated {devices} devices: {sim.totals()}")


@edge.command()
@click.argument("device_id")
def enroll(device_id: str) -> None:
    """Issue DEVICE_ID's mTLS client certificate (CN = DEVICE_ID) from the development CA
    that `edgeloop infra up` created in $EDGELOOP_HOME/pki, and print where it is.

    Mosquitto's ACL lets a device publish only under `edgeloop/<CN>/`. Idempotent: a
    still-valid certificate is kept. For a real fleet, issue certificates from your own
    CA (docs/architecture.md) and pass --cert/--key/--ca to `edge run`.
    """
    from edgeloop.infra.pki import DevPki

    mqtt: MqttSettings = MqttSettings.load(edgeloop_home())
    if mqtt.pki_dir is None:
        raise ConfigError("no development CA: run `edgeloop infra up` first (EDGELOOP_PKI_DIR)")
    creds = DevPki(mqtt.pki_dir).device_cert(device_id)
    click.echo(f"certificate {creds.cert}\nkey         {creds.key}\nCA          {creds.ca}")
