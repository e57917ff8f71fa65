"""The names of the per-layer statistics (nrexp/monitor.py computes them, nrexp/writers.py writes them as
`<metric>/<layer>`), in a module of their own so that both import them and neither imports the other's
module for them: monitor.watch writes through writers.TensorBoardWriter."""

LAYER_METRICS = ("act_norm", "act_cos", "grad_norm", "weight_norm", "weight_change", "update_ratio")
