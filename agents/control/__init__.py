"""The control plane's pure core: stream signals, the adaptive offload threshold, training
triggers and the rollout judge.

Every module here is plain, typed and deterministic: `step(record/window, state) ->
outputs` functions over small state dataclasses that serialize to JSON-able dicts (a Faust
table changelog stores them). No Faust, no Kafka, no clock: time is the events' own time,
passed in, so a replay after a crash or a rebalance yields the same outputs and ids.
"""
