"""LightningModules: training modules (stage 1, stage 2, pixel prior) and predict modules."""
