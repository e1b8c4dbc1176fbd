"""The layout planner: for a model, its data and a cluster, the per-GPU memory and modelled step time of every
TP x PP x CP x DP x recompute layout; the ones that fit, best first, and the reason each other one fails.
`python -m megalign.plan` (tools/plan.py) is its command line.

  hardware.py   the GPU catalogue (memory, bf16 peak, NVLink and network bandwidth)
  workload.py   what a micro-batch holds: the longest pack (memory) and the mean pack (time), from a dataset
  layout.py     a layout, and the candidates of a cluster
  memory.py     per-GPU memory: weights, gradients, optimizer shards, activations, K/V gathers, logits, transients
  step_time.py  modelled step time: FLOPs at an assumed MFU, TP/CP/PP/DP communication, the pipeline bubble
  planner.py    every candidate checked (config.validate, nodes, memory), ranked
  report.py     the table and the JSON
  inputs.py     the model (preset, HF config.json, YAML + overrides) and the workload from a command line

Imports nothing heavy (no torch): planning runs on a login node in well under a second (--hf-config
excepted: megalign.convert's package imports torch, ~7 s).
"""
