"""Dataset constants shared by writers, datasets and models (the layouts in DATA.md)."""

NUM_CLASSES = {"mmimdb": 23, "food101": 101, "hatememes": 2}

# METHODS.md §1.1: fixed genre order of the MM-IMDb multi-hot label (index = position).
MMIMDB_GENRES = [
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
    "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
]

# METHODS.md §1.2: split -> arrow file stem (<stem>.arrow).
ARROW_SPLITS = {
    "mmimdb": {"train": "mmimdb_train", "val": "mmimdb_dev", "test": "mmimdb_test"},
    "food101": {"train": "food101_train", "val": "food101_val", "test": "food101_test"},
    "hatememes": {"train": "hatememes_train", "val": "hatememes_dev", "test": "hatememes_test"},
}

TEXT_COLUMN = {"mmimdb": "plots", "food101": "text", "hatememes": "text"}

# METHODS.md §0: per-sample missing type.
MISSING_COMPLETE, MISSING_TEXT, MISSING_IMAGE = 0, 1, 2
