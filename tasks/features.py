"""Reading a gradient-feature artifact (`gradients.features`): record ids and one float32 matrix. A library
module, so the select stage reads the features without importing the stage that writes them."""

from __future__ import annotations

import numpy as np
from tracecore.storage.store import ArtifactStore


def read_features(store: ArtifactStore, features_ref: str,
                  column: str = "feature") -> tuple[list[str], np.ndarray]:
    table = store.read_table(features_ref, columns=["record_id", column])
    dim = table.schema.field(column).type.list_size
    flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("record_id").to_pylist(), flat.astype(np.float32).reshape(-1, dim)
