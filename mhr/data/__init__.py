"""Data in: fetch, import and synthesize datasets into a workspace store.

Every route ends in `mhr.data.ingest.build_store`: a whole new store, built atomically under the
dataset's write lock and skipped when the existing store has the same data key.
"""
