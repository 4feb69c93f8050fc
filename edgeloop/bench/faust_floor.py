"""The Faust floor: what Faust's own per-event delivery costs on this machine.

`edgeloop bench agents` compares the agents worker with a bare aiokafka loop. Between the
two sits Faust itself, which the stack requires: this process is a Faust app whose one
agent does what the worker's enrich agent does around its step and nothing else. It
takes the backlog in `take_events` batches of the worker's size, and copies each
record's bytes, undecoded, to a sink topic through the worker's batch sender (one record
batch per topic-partition, acks=all), and takes the next batch once Kafka acknowledged
the copies. No decoding, no table, no control plane: a Faust worker built like the
agents worker (serial batches of `batch_max`, each acknowledged before the next) that
does any work runs below it.

Two variants (`--lean`):
- stock: Faust 0.15.3's consumer and producer, the topic read with its `raw` codec;
- lean: with the worker's delivery changes (agents/eager_drain.py, agents/lean_faust.py),
  its event loop (uvloop) and its collector thresholds (edgeloop/cli/agents_cmd.py).

Run by the bench as a subprocess; it writes one JSON object to `--out` once `--n` records
were copied: records, seconds and CPU seconds (all threads) from the first batch's
acknowledgement to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import faust
import uvloop

from edgeloop.agents.app import _faust_app_with_settings
from edgeloop.agents.batch_send import BatchSender
from edgeloop.agents.eager_drain import EagerDrainConsumer
from edgeloop.agents.lean_faust import LeanProducer, RawSchema
from edgeloop.agents.records import Out
from edgeloop.agents.settings import AgentsSettings
from edgeloop.core.settings import KafkaSettings

SINK = "bench.faust.v1"


def build(args: argparse.Namespace) -> Any:
    """The floor's Faust app, with the agents worker's settings (`AgentsSettings`)."""
    settings = AgentsSettings(
        app_id=f"bench-faust-floor-{'lean' if args.lean else 'stock'}",
        partitions=args.partitions,
        web_port=args.web_port,
        data_dir=Path(args.data_dir),
    )
    app = _faust_app_with_settings(settings, KafkaSettings(bootstrap=args.bootstrap))
    if args.lean:
        app.transport.Consumer = EagerDrainConsumer
        app.transport.Producer = LeanProducer
        topic = app.topic(args.source, schema=RawSchema())
    else:
        topic = app.topic(
            args.source,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
    out_path = Path(args.out)
    state: dict[str, Any] = {"copied": 0, "t0": None, "cpu0": 0.0, "first": 0, "done": False}

    async def copy(stream: Any) -> None:
        sender: BatchSender | None = None
        async for events in stream.take_events(settings.batch_max, settings.batch_within_s):
            producer = app.producer._ensure_producer()
            if sender is None or sender.producer is not producer:
                sender = BatchSender(producer)
            outs = [Out(SINK, e.message.key, e.message.value) for e in events]
            sent = await sender.send(outs)
            for s in sent:
                await s.future
            state["copied"] += len(outs)
            if state["t0"] is None:
                state.update(t0=time.perf_counter(), cpu0=time.process_time(), first=len(outs))
            elif state["copied"] >= args.n and not state["done"]:
                state["done"] = True
                result = {
                    "records": state["copied"] - state["first"],
                    "seconds": time.perf_counter() - state["t0"],
                    "cpu_s": time.process_time() - state["cpu0"],
                }
                await asyncio.to_thread(out_path.write_text, json.dumps(result))

    app.agent(topic, name="floor", concurrency=1)(copy)
    return app


def main() -> None:
    """Run the floor worker until the bench stops it (SIGTERM)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap host:port")
    parser.add_argument("--source", required=True, help="topic holding the backlog")
    parser.add_argument("--partitions", type=int, required=True, help="the source's partitions")
    parser.add_argument("--n", type=int, required=True, help="records to copy before reporting")
    parser.add_argument("--out", required=True, help="where the JSON result is written")
    parser.add_argument("--data-dir", required=True, help="Faust's data folder")
    parser.add_argument("--web-port", type=int, required=True, help="Faust's web port")
    parser.add_argument("--lean", action="store_true", help="with the worker's Faust changes")
    args = parser.parse_args()
    app = build(args)
    if args.lean:  # as `edgeloop agents` does before it runs its worker
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    worker = faust.Worker(app, loglevel="warning", quiet=True)
    if args.lean:
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 10)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
