"""`index.html` of `mhr report`: the report's Markdown as one self-contained page."""

from __future__ import annotations

import base64
import json
import re

from mhr.report import _plt, table_markdown
from mhr.report_html import write_html


def test_report_page_is_self_contained(tmp_path):
    rows = [{"variant": "base", "seeds": 2, "runs": ["a", "b"], "ndcg@10": {"mean": 0.1234, "ci95": 0.01},
             "H@10": {"mean": 0.9, "ci95": 0.05}},
            {"variant": "item <heads>", "seeds": 1, "runs": ["c"], "ndcg@10": {"mean": 0.2, "ci95": 0.0}}]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "ndcg10.png")
    plt.close(fig)
    (tmp_path / "frontier.json").write_text(json.dumps({"base": [[0.5, 0.1, 1.2], [0.0, 0.12, 0.9]]}))
    md = ["# My `report`", "", "Dataset `tiny`, split `test`.", "", table_markdown(rows),
          "## NDCG@10 by variant", "", "![NDCG@10 by variant](ndcg10.png)", "", "![gone](missing.png)", ""]
    (tmp_path / "index.md").write_text("\n".join(md))
    page = write_html(tmp_path / "index.md").read_text()
    assert "<title>My `report`</title>" in page and "<h1>My <code>report</code></h1>" in page
    assert "<th>variant</th><th>seeds</th><th>ndcg@10</th><th>H@10</th>" in page
    assert "<td>12.34 ± 1.00</td>" in page and "<td>item &lt;heads&gt;</td>" in page  # escaped
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [(tmp_path / "ndcg10.png").read_bytes()]
    assert "missing.png not found" in page
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []  # nothing to fetch: readable offline
    frontier = page.split("frontier: the points")[1]
    assert frontier.index("<td>0</td><td>12.00</td><td>0.900</td>") < frontier.index("<td>0.5</td><td>10.00</td>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier.json", "index.html", "index.md", "ndcg10.png"]
