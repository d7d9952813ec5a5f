"""Data preparation of the nightly retrain (see docs/data-preparation.md).

``prepare(cfg, sft_rows, pair_rows, tokenizer, seed=...)`` turns exported rows into TRL-ready
train / validation / holdout splits; ``tokenize_with_mask`` tokenises one formatted row with the
prompt masked from the loss.
"""

from retrain.data.formatting import IGNORE_INDEX, tokenize_with_mask
from retrain.data.pipeline import NotEnoughData, PreparedData, StageStats, prepare
from retrain.data.sources import SourceData, export_from_store, load_export_dir, load_seed_dataset, read_file

__all__ = [
    "IGNORE_INDEX",
    "NotEnoughData",
    "PreparedData",
    "SourceData",
    "StageStats",
    "export_from_store",
    "load_export_dir",
    "load_seed_dataset",
    "prepare",
    "read_file",
    "tokenize_with_mask",
]
