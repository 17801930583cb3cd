"""irzsq helpers: the tested code behind the numbered notebooks.

Floors (each imports only from the floors below it):
  4  batch (papermill runs, manifest)
  3  train, evaluate, viz
  2  synth (generators), data (COCO/FLIR datasets), models
  1  runs (run ids, atomic writes, results layout), config (seeding, printing)
"""
