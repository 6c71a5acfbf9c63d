"""`mhr data import PATH --format …`: pick the reader, key the stage on the input bytes, ingest.

The stage key is `stage_key("data", params, {"source": sha256 of every input file})`, computed
before any parsing, so re-importing unchanged files is a fast cache hit; any change to a file or
to an option that shapes the store gives a new key. File paths are not part of the key: the same
bytes imported from another folder are the same dataset.
"""

from __future__ import annotations

import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from mhr.data.formats import amazon_files, read_amazon, read_paper, read_sequences
from mhr.data.ingest import BuildResult, import_source
from mhr.data.long import ItemTable, LongColumns, read_long
from mhr.data.movielens import find_layout, input_files, read_movielens
from mhr.data.source import files_sha256, require_file
from mhr.errors import InputError, UsageError
from mhr.workspace import Dataset

FORMATS = ("movielens", "paper", "long", "sequence", "amazon-json")


@dataclass(frozen=True)
class ImportOptions:
    """Column mapping and item-table options (each format uses the ones that apply to it)."""

    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    event_col: str | None = None
    no_time: bool = False
    delimiter: str | None = None
    items: Path | None = None
    item_id_col: str | None = None
    item_title_col: str | None = None
    item_text_cols: tuple[str, ...] = ()
    tag_col: str | None = None
    tag_sep: str | None = None

    def key_params(self) -> dict:
        d = asdict(self)
        d.pop("items")
        d["item_text_cols"] = list(self.item_text_cols)
        return {k: v for k, v in d.items() if v not in (None, False, [])}


def default_name(path: Path) -> str:
    """A dataset name from the input path: `ml-1m.zip` -> `ml-1m`, `Scientific.inter.json` -> `Scientific`."""
    name = path.name
    for suffix in (".inter.json", ".zip", ".parquet", ".csv", ".txt", ".json", ".dat"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "data"
    return name or "data"


def import_data(dataset: Dataset, path: Path, fmt: str, opts: ImportOptions, *, dedupe: str = "keep",
                min_history: int = 1, force: bool = False, discard_priors: bool = False) -> BuildResult:
    """Import `path` in format `fmt` into `dataset` (cached on the input bytes and options)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}", hint=f"one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise InputError(f"{path}: no such file or folder", hint="check PATH")
    params = {"format": fmt, **opts.key_params()}
    common = {"dedupe": dedupe, "min_history": min_history, "force": force, "discard_priors": discard_priors}
    if fmt == "movielens":
        return _import_movielens(dataset, path, params, common)
    if fmt == "amazon-json":
        inter, sibling = amazon_files(path)
        items = opts.items or sibling
        files = [inter] + ([items] if items else [])
        read = lambda: read_amazon(inter, items)  # noqa: E731
    elif fmt == "sequence":
        files = [require_file(path)] + ([opts.items] if opts.items else [])
        read = lambda: read_sequences(path, opts.items)  # noqa: E731
    else:
        require_file(path)
        items = _item_table(opts)
        files = [path] + ([items.path] if items else [])
        if fmt == "paper":
            read = lambda: read_paper(  # noqa: E731
                path, items, user_col=opts.user_col or "user_id", item_col=opts.item_col or "item_id",
                time_col=opts.time_col or "timestamp", event_col=opts.event_col or "event_id")
        else:
            cols = LongColumns(
                user=opts.user_col or "user_id",
                item=opts.item_col or "item_id",
                time=None if opts.no_time else (opts.time_col or "timestamp"),
                event=opts.event_col,
                delimiter=opts.delimiter,
            )
            read = lambda: read_long(path, cols, items)  # noqa: E731
    for f in files:
        require_file(f)
    return import_source(dataset, read, params, {"source": files_sha256(files)}, **common)


def _item_table(opts: ImportOptions) -> ItemTable | None:
    if opts.items is None:
        if opts.item_text_cols or opts.tag_col or opts.item_title_col:
            raise UsageError("--item-text-cols/--tag-col/--item-title-col need --items PATH")
        return None
    return ItemTable(opts.items, opts.item_id_col, opts.item_title_col, opts.item_text_cols, opts.tag_col, opts.tag_sep)


def extract_zip(path: Path, dest: Path) -> None:
    """Unpack an archive; a damaged one (bad CRC, cut short) is an InputError naming it."""
    try:
        with zipfile.ZipFile(path) as z:
            z.extractall(dest)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise InputError(f"{path}: damaged zip archive ({e})",
                         hint="download or copy the archive again (or give the extracted folder)") from None


def _import_movielens(dataset: Dataset, path: Path, params: dict, common: dict) -> BuildResult:
    if path.is_file() and zipfile.is_zipfile(path):
        inputs = {"source": files_sha256([path])}

        def read():
            with tempfile.TemporaryDirectory() as tmp:
                extract_zip(path, Path(tmp))
                folder, ratings = find_layout(Path(tmp))
                return read_movielens(folder, ratings)

        return import_source(dataset, read, params, inputs, **common)
    if not path.is_dir():
        raise InputError(f"{path}: not a folder or .zip archive", hint="give the extracted MovieLens folder or its .zip")
    folder, ratings = find_layout(path)
    inputs = {"source": files_sha256(input_files(folder, ratings))}
    return import_source(dataset, lambda: read_movielens(folder, ratings), params, inputs, **common)
