"""What every number of ``bench.json`` means: written into each results file, so that the raw
times explain themselves."""

CONVENTIONS = {
    "time": "median wall-clock milliseconds (time.perf_counter) of `repeats` runs after `warmup` "
            "runs; forward runs under torch.no_grad(); the layer measurements that are compared "
            "with each other (all forwards; all forward + backwards) are timed round-robin",
    "fwd_flops": "FLOP model of the expert's attention core: "
                 "expert.flops_per_token(T, D, H) * B * T (multiply-add = 2 FLOPs; q/k/v/out "
                 "projections not included)",
    "fwd_bwd_flops": "3 x fwd_flops by convention (backward ~ 2 x forward), not counted",
    "fraction_of_matmul": "achieved GFLOP/s divided by this run's fp32 matmul GFLOP/s",
    "fwd_bwd": "forward, then torch.autograd.grad of the output against a random cotangent with "
               "respect to q, k, v (experts) or the input and all parameters (layer)",
    "local_scaling": "the local expert's forward at T=2048 and T=4096 timed in one "
                     "round-robin (the expert rows time each length in its own); the scaling "
                     "target reads its ratio",
    "hard_layer": "RoutedAttention with one-hot weights, sparse=True: tokens are assigned to "
                  "experts at random in the mix's proportions (exact counts per sequence)",
    "measured_ratio": "layer time of the mix / layer time of the full-only layer (every token "
                      "one-hot on full, i.e. the mix (1, 0, 0))",
    "projected_cost_attention_core": "sum_k share_k * c_k with c = cost_vector(cfg, T), "
                                     "projections excluded: the attention-core FLOPs relative "
                                     "to full",
    "projected_cost_with_projections": "sum_k share_k * c_k with c from expert_flops(cfg, T, "
                                       "include_projections=True) relative to full: the layer's "
                                       "FLOPs including the shared q/k/v/out projections "
                                       "(8 D^2 per token), the fair comparison for "
                                       "measured_ratio",
    "projected_cost_timed": "sum_k share_k * c_k with c_k = (full-only layer time - dense full "
                            "core time + dense core time of expert k) / full-only layer time, "
                            "the dense cores timed on the layer's own heads: what the mix would "
                            "cost if every expert ran its rows at its dense speed. "
                            "measured_ratio / projected_cost_timed isolates the overhead of the "
                            "sparse (gathered-row) paths from the FLOP model's optimism",
    "hard_layer_target": "measured_ratio <= 1.3 x projected_cost_with_projections (the layer times "
                         "include the projections); the attention-core version is recorded too",
}
