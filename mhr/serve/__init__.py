"""`mhr serve`: a trained run behind an HTTP API and a page.

- `catalogue.py` — what the service reads from the store once at start: items (raw id, title, tags),
  users and their histories, the item priors' groups; no web framework.
- `batcher.py` — an asyncio micro-batcher: concurrent ranking requests become one `rank_histories`
  call (through `mhr.ranking.service.Recommender.rank_encoded`), run on one worker thread.
- `app.py` — the FastAPI application: routes, request models, errors as 4xx JSON naming the field.
- `static/` — the page at `/` (plain HTML, CSS and JS; no build step, no CDN).

Only `mhr.cli.serve` imports `app.py`, so `import mhr` and `mhr --help` never load FastAPI or torch.
"""
