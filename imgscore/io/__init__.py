"""Storage: one filesystem layer for local paths and object-store URLs, Parquet part files,
containment of paths read from run state."""
