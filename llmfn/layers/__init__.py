"""Pure layer functions over TensorDict sub-trees. Each file: `init_x(cfg, gen) -> TensorDict`
and `x(params, inputs, cfg) -> outputs`. Nothing here knows about training or data."""
