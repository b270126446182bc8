"""Training: the LightningModule, its loss, callbacks, checkpoint retention, and building a run from Hydra config."""
