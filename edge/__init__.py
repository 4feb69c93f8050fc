"""The edge device daemon (imports the `edge` extra only: no torch, Faust or aiokafka).

- `source`: frame sources and the newest-wins frame queue
- `inference`: ONNX Runtime sessions and the inference thread
- `policy`: confidence, offload decision, audit sample, byte budget
- `pipeline`: the per-frame work (preprocess, run, decide, persist)
- `outbox`: the durable SQLite (WAL) outbox
- `uplink`: MQTT 5 over mTLS, publishing and downlink receive
- `control`, `updater`, `slots`: thresholds, verdicts, signed model releases, A/B slots
- `state`: applied versions, persisted atomically
- `daemon`: one device; `simulator`: N devices in one process
"""
