"""`edgeloop demo`: the whole loop on one host, supervised, scripted, watched and reported.

- `supervisor`: the child processes (bridge, agents workers, `train serve`, the simulated
  fleet), each with its own log, stopped in order.
- `scenario`: the scripted phases (steady → drift → thresholds react → trigger → training →
  canary → waves → full → a bad release rolled back).
- `observe`: scrapes every child's `/metrics` into frames (per cohort: accuracy against
  the simulator's labels, offload rate vs budget, tau, release stage).
- `dashboard`: the rich `Live` view of the newest frame.
- `report`: report.json, PNG plots and report.md with each release's lineage.
"""
