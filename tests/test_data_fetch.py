"""`mhr data fetch movielens-100k`: the offline route (recbole wheel from PyPI) with exact counts,
and the GroupLens route on an archive rebuilt from the same files gives an identical store."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.test_data_common import meta, rows

TABLES = ("SELECT * FROM items ORDER BY item_id", "SELECT * FROM users ORDER BY user_id",
          "SELECT * FROM interactions ORDER BY user_id, pos")


def _grouplens_zip(recbole_dir: Path, dest: Path) -> None:
    """An ml-100k.zip in GroupLens' layout (latin-1, '|' and one-hot genres) from RecBole's files."""
    from mhr.data.movielens import GENRES_100K

    def lines(name: str) -> list[list[str]]:
        return [r.split("\t") for r in (recbole_dir / name).read_text("utf-8").splitlines()[1:]]

    data = "".join("\t".join(r) + "\n" for r in lines("ml-100k.inter"))
    items = []
    for item_id, title, year, genres in lines("ml-100k.item"):
        full, date = ("unknown", "") if title == "unkonwn" else (f"{title} ({year})", f"01-Jan-{year}")
        flags = ["1" if g in genres.split() else "0" for g in GENRES_100K]
        items.append("|".join([item_id, full, date, "", "http://us.imdb.com/", *flags]))
    users = ["|".join(r) for r in lines("ml-100k.user")]
    with zipfile.ZipFile(dest, "w") as z:
        z.writestr("ml-100k/u.data", data)
        z.writestr("ml-100k/u.item", ("\n".join(items) + "\n").encode("latin-1"))
        z.writestr("ml-100k/u.user", "\n".join(users) + "\n")
        z.writestr("ml-100k/u.genre", "".join(f"{g}|{i}\n" for i, g in enumerate(GENRES_100K)))


@pytest.mark.network
def test_fetch_movielens_100k_offline_route_and_identical_grouplens_route(cli, workspace: Path):
    proc = cli("data", "fetch", "movielens-100k", "--route", "recbole", workspace=workspace, timeout=900)
    assert proc.stdout == "dataset:ml-100k\n"
    assert rows(workspace, "ml-100k", "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM items), "
                "(SELECT count(*) FROM interactions)") == [(943, 1682, 100_000)]
    assert rows(workspace, "ml-100k", "SELECT count(DISTINCT tag) FROM (SELECT unnest(tags) tag FROM items)") == [(19,)]
    assert rows(workspace, "ml-100k", "SELECT title, tags, attrs FROM items WHERE item_id = 1") == [
        ("Toy Story (1995)", ["Animation", "Children's", "Comedy"], '{"year": 1995}')]
    assert rows(workspace, "ml-100k", "SELECT attrs FROM users WHERE user_id = 1") == [
        ('{"age": 24, "gender": "M", "occupation": "technician", "zip": "85711"}',)]
    assert rows(workspace, "ml-100k", "SELECT count(*) FROM interactions WHERE event NOT IN ('1','2','3','4','5')") == [(0,)]
    assert meta(workspace, "ml-100k")["has_timestamps"] == "true"
    info = json.loads(cli("data", "show", "--json", workspace=workspace).stdout)
    assert info["interactions"] == 100_000 and info["sequence_length"]["p0"] == 20

    # cached download + same key: a cache hit without network
    again = cli("data", "fetch", "movielens-100k", workspace=workspace)
    assert "cached" in again.stderr and again.stdout == "dataset:ml-100k\n"

    # the GroupLens route on the same data gives the identical store (and key)
    cache = workspace / ".cache" / "movielens-100k"
    other = workspace.parent / "ws2"
    (other / ".cache" / "movielens-100k").mkdir(parents=True)
    _grouplens_zip(cache / "recbole-ml-100k", other / ".cache" / "movielens-100k" / "ml-100k.zip")
    proc = cli("data", "fetch", "movielens-100k", "--route", "grouplens", workspace=other)
    assert "GroupLens" in proc.stderr
    for q in TABLES:
        assert rows(other, "ml-100k", q) == rows(workspace, "ml-100k", q)
    assert meta(other, "ml-100k") == meta(workspace, "ml-100k")
    shutil.rmtree(other)
