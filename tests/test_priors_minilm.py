"""Offline tag consolidation with the bundled MiniLM encoder, on MovieLens genre names."""

from __future__ import annotations

import pytest

from mhr.priors.encoder import cluster_tags, zero_shot

ML_GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
             "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
             "Western"]
CATEGORIES = ["Action", "Comedy", "Drama", "Thriller", "Documentary"]


@pytest.fixture(scope="module")
def zs():
    return zero_shot(ML_GENRES, CATEGORIES, threshold=0.6, template="{} movies")


def test_zero_shot_maps_every_genre_sensibly(zs):
    mapping, best = zs
    assert set(mapping) == set(ML_GENRES) and all(mapping[g] for g in ML_GENRES)  # none unmapped
    for c in CATEGORIES:  # a category name is its own best match
        assert mapping[c][0] == c and best[c] > 0.99
    # clear-cut cases only: the encoder is small, and these are what a person would say too
    assert mapping["Horror"][0] == "Thriller"
    assert mapping["Mystery"][0] == "Thriller"
    assert mapping["Adventure"][0] == "Action"
    assert mapping["Romance"][0] == "Drama"


def test_zero_shot_threshold_controls_multi_label():
    strict, _ = zero_shot(ML_GENRES, CATEGORIES, threshold=1.01, template="{} movies")
    loose, _ = zero_shot(ML_GENRES, CATEGORIES, threshold=-1.0, template="{} movies")
    assert all(len(v) == 1 for v in strict.values())
    assert all(len(v) == len(CATEGORIES) for v in loose.values())


def test_clusters_named_from_member_tags():
    freq = list(range(len(ML_GENRES), 0, -1))
    mapping, names = cluster_tags(ML_GENRES, freq, 5, template="{} movies")
    assert len(names) == 5 and set(mapping) == set(ML_GENRES)
    assert all(len(v) == 1 and v[0] in names for v in mapping.values())
    assert mapping["Horror"] == mapping["Thriller"]  # near-synonyms land together
    assert names[0].startswith("Action")  # the biggest cluster is named after its most frequent tag
