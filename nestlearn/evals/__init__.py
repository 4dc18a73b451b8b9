"""The experiments that test the paper's claims, on trained or freshly trained models: the continual-learning
protocol (`continual`), the long-context suite (`longctx`, with the needles of `niah`), lm-evaluation-harness
(`harness`) and several presets on one budget (`compare`, the main job)."""
