"""Ranking: score the catalogue with a trained model, fuse the heads, and measure or serve the lists."""
