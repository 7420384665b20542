"""Run records: the run folder (run_folder), checkpoints (checkpoint, checkpoint_record, archive),
metrics and system figures (metrics, monitor), the report and plot (report), provenance and
MLflow tracking (provenance, tracking)."""
