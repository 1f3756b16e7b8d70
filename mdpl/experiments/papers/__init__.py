"""Each paper's tables and figures as experiment cells, one module per method card (``paper_tables``)."""
