"""The HTML report: the counts per class the loop holds, embedded charts and crops, nothing fetched from outside,
names escaped, and a crop whose image is gone drawn as a note instead of failing the report."""

from __future__ import annotations

import re
from dataclasses import replace
from html.parser import HTMLParser

from anomaly_discovery.platform.export.report import counts_table, render_report
from anomaly_discovery.platform.export.snapshot import read_snapshot


class Collector(HTMLParser):
    """Tags with their attributes, in document order."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(html: str) -> list[tuple[str, dict]]:
    collector = Collector()
    collector.feed(html)
    return collector.tags


def test_the_report_counts_what_the_loop_holds_and_embeds_everything(loop, reviewed):
    html = render_report(read_snapshot(loop.store, loop.embeddings))
    tags = parse(html)
    rows = {(a["data-class"], a["data-status"]): int(a["data-regions"]) for t, a in tags
            if t == "tr" and "data-class" in a}
    sizes = {loop.classes[i].name: n for i, n in loop.class_sizes().items()}
    assert {name: n for (name, status), n in rows.items() if status != "rejected"} == sizes
    assert rows[("rejected", "rejected")] == 13
    sources = [a.get("src") or a.get("href") for t, a in tags if t in ("img", "link", "script", "a", "iframe")]
    assert sources and all(s.startswith("data:image/") for s in sources), "everything is embedded, no link out"
    assert not re.search(r"(src|href)=\"?(https?:)?//", html) and "<script" not in html
    crops = [a for t, a in tags if t == "img" and a.get("alt", "").startswith("region")]
    assert len(crops) == 6 * 4, "six crops for each of rust, blue stain, the confirmed class and rejected"
    assert f"#<span id=\"last-decision\">{reviewed.last_decision}</span>" in html and "discovery-1" in html


def test_zero_region_classes_are_listed_and_names_are_escaped(loop):
    rust = next(c for c in loop.classes.values() if c.name == "rust")
    loop.rename(rust.id, "<b>rust</b> & co", expected_version=rust.version)
    loop.move(loop.mirror.members(rust.id).tolist(), None)
    snapshot = read_snapshot(loop.store, loop.embeddings)
    table = counts_table(snapshot)
    assert table.set_index("class").loc["<b>rust</b> & co", "regions"] == 0
    html = render_report(snapshot)
    assert "&lt;b&gt;rust&lt;/b&gt; &amp; co" in html and "<b>rust</b>" not in html


def test_a_crop_whose_image_is_gone_is_a_note(loop, tmp_path):
    snapshot = read_snapshot(loop.store, loop.embeddings)
    regions = snapshot.regions.assign(image_path=str(tmp_path / "deleted.png"))
    html = render_report(replace(snapshot, regions=regions))
    assert html.count('class="missing"') == 6 * 4 and "image unreadable" in html
