"""fastdetr's benchmarks: scripts run on a GPU (`python benchmarks/<name>.py --out DIR`), one results table."""
