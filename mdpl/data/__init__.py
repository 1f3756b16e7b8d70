"""mdpl.data: datasets, arrow writers and missing-modality simulation (docs/methods.md §1)."""
