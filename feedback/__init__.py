"""loraloop's feedback package: the durable event store (DuckDB over JSONL WAL + Parquet segments),
experiments and sticky assignment, statistics and the A/B report, and training-data export.

Entry points: feedback.store.EventStore (write side, one per gateway replica),
feedback.reader.StoreReader (read side, any process), feedback.experiments.ExperimentRepo,
feedback.report.build_report, feedback.export.export_training_data, feedback.cli.register.
Importing the package creates nothing (no threads, files or metrics).
"""
