"""mdpl.data: datasets, arrow writers and missing-modality simulation (METHODS.md §1)."""
