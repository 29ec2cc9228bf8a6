"""The HTML report renders from a synthetic run dir, escapes everything, embeds its images."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from medgen.config import RunConfig
from medgen.evaluation.report import write_report

EVIL = '<script>alert("x")</script>'
VOID = {"meta", "img", "br", "hr", "input", "link", "circle", "line", "rect", "polyline", "path"}


class Collector(HTMLParser):
    """Collects tags, img sources, section ids, and checks that non-void tags nest."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[str] = []
        self.sections: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        if tag == "section":
            self.sections.append(attrs.get("id", ""))
        if tag == "script":
            self.scripts += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def parse(path: Path) -> Collector:
    parser = Collector()
    parser.feed(path.read_text())
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    return parser


def make_run_dir(root: Path) -> Path:
    run = root / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.toml").write_text(RunConfig(sites="A,B", accountant="rdp", delta=1e-6).to_toml())
    lines = []
    for r in (1, 2, 3):
        lines.append({"round": r, "kind": "train", "aggregate": {"num_examples": 64.0},
                      "per_site": {"A": {"epsilon": 0.5 * r, "delta": 1e-6, "loss_d": 1.0 / r, "loss_g": 2.0},
                                   "B": {"epsilon": 0.6 * r, "delta": 1e-6, "loss_d": 1.2 / r, "loss_g": 2.1}},
                      "excluded": [{"site": "B", "reason": EVIL}] if r == 2 else []})
        metrics = {}
        for site in ("A", "B"):
            metrics.update({f"fd/{site}": 10.0 / r, f"fd_floor/{site}": 0.5, f"kid/{site}": 0.1 / r,
                            f"kid_lo/{site}": 0.05 / r, f"kid_hi/{site}": 0.2 / r, f"site_acc/{site}": 0.3 * r,
                            f"n_gen/{site}": 24.0, f"n_ref/{site}": 24.0, f"seed/{site}": 123456.0 + r})
        lines.append({"round": r, "kind": "eval", "metrics": {**metrics, "fd_mean": 10.0 / r}})
        Image.new("RGB", (20, 10), (r * 40, 0, 0)).save(run / "samples" / f"round_{r:03d}.png")
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    (run / "metrics.jsonl").write_text(text)
    (run / "privacy.json").write_text(json.dumps({"unit": "patient", "accountant": "rdp", "delta": 1e-6,
                                                  "reported_by_sites": {"A": {"epsilon": 1.5}}}))
    (run / "evaluator.json").write_text(json.dumps({
        "extractor_name": "FD_medgenenc-v1", "extractor_sha256": "ab" * 32, "classifier_sha256": "cd" * 32,
        "classifier_real_acc": {"A": 1.0, "B": 0.97}}))
    return run


def test_full_report_has_every_section_data_uri_images_and_numbers(tmp_path):
    run = make_run_dir(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    html = path.read_text()
    parsed = parse(path)
    assert parsed.sections == ["summary", "samples", "evaluation", "tissue", "training", "privacy",
                               "excluded", "trained-encoder", "evaluator", "config"]
    assert len(parsed.imgs) >= 3 and all(src.startswith("data:image/png;base64,") for src in parsed.imgs)
    assert parsed.scripts == 0 and EVIL not in html and "&lt;script&gt;" in html
    assert "Opacus RDP accountant" in html and "patient" in html and "1e-06" in html
    assert "ab" * 32 in html and "0.97" in html       # evaluator hashes, classifier's own accuracy
    assert "FD_medgenenc-v1" in html and "FID" not in html.replace("FD_", "")
    assert "not a headline metric" in html            # the old FD is labelled for what it is
    assert html.count("<svg") >= 5                    # loss_d, epsilon, FD, KID, site acc
    assert 'stroke-dasharray' in html                 # the floor line
    assert "123459" in html                           # the seed of round 3 is printed
    assert "1 line(s) of metrics.jsonl were unreadable" in html
    assert "privacy.json as written" in html          # the raw ledger only as a collapsed appendix
    assert not list(run.glob("*.tmp"))


def test_training_charts_hold_one_quantity_each_and_counts_never_share_an_axis_with_losses(tmp_path):
    run = make_run_dir(tmp_path)
    html = write_report(run).read_text()
    titles = re.findall(r'aria-label="([^"]+)"', html)
    assert "aggregate metrics" not in html
    assert any(t.startswith("loss_d per site") for t in titles)
    assert not any("num_examples" in t and "loss" in t for t in titles)


@pytest.mark.parametrize("pieces", [(), ("config.toml",), ("metrics.jsonl",)])
def test_report_renders_with_missing_pieces(tmp_path, pieces):
    run = tmp_path / "empty"
    run.mkdir()
    if "config.toml" in pieces:
        (run / "config.toml").write_text(RunConfig().to_toml())
    if "metrics.jsonl" in pieces:
        (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "kind": "train", "per_site": {
            "A": {"epsilon": 1.0, "loss_d": "not a number"}}, "excluded": [], "aggregate": {}}) + "\n")
    parsed = parse(write_report(run))
    assert parsed.imgs == [] and "evaluation" in parsed.sections
    text = (run / "report.html").read_text()
    assert "No evaluation rounds recorded" in text and "No sample grids found" in text


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_federated_evaluation_is_a_table_with_a_verdict_per_site(tmp_path):
    run = make_run_dir(tmp_path)
    scalars = {"fed-noise-multiplier": 4.0, "fed-tissue-bands-sd": 0.01, "fed-tissue-bands-floor-sd": 0.01}
    (run / "federated_eval.json").write_text(json.dumps({"3": {
        "per_site": {"A": {**scalars, "fed-tissue-bands": 0.40, "fed-tissue-bands-floor": 0.05},   # worse
                     "B": {**scalars, "fed-tissue-bands": 0.06, "fed-tissue-bands-floor": 0.05},   # at floor
                     "C": {**scalars, "fed-tissue-bands-sd": 0.3, "fed-tissue-bands": 0.5,
                           "fed-tissue-bands-floor": 0.05}},                                         # too noisy
        "excluded": [{"site": "D", "reason": "refused by the hospital's allow-list"}]}}))
    html = write_report(run).read_text()
    parsed = parse(run / "report.html")
    assert "federated-eval" in parsed.sections and not parsed.errors
    part = html[html.index('id="federated-eval"'):]
    part = part[:part.index("</section>")]
    assert part.count("worse than its real patients") == 1 and part.count("within the noise of its floor") == 1
    assert part.count("not distinguishable") == 1 and "refused by the hospital" in part
    assert "0.4 ± 0.01" in part
