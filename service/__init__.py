"""The bocompress control plane: REST API, dashboard, BO engine and persistence."""
