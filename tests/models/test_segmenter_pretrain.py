"""`medgen pretrain-segmenter`: S from public label maps only, with its provenance."""

import hashlib
import json

import torch

from medgen.models.segmenter import SegmenterSettings, build_segmenter
from medgen.models.segmenter_pretrain import main, provenance_path


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_writes_a_loadable_segmenter_and_its_record_and_leaves_the_bank_alone(tiny_federation, tmp_path):
    public = tiny_federation / "public"
    before = _digest(public)
    out = tmp_path / "S.pt"
    assert main(["--public", str(public), "--out", str(out), "--steps", "3", "--image-size", "32"]) == 0
    assert _digest(public) == before
    net = build_segmenter(SegmenterSettings())
    state = torch.load(out, weights_only=True)
    net.load_state_dict(state)  # strict: exactly S's architecture
    assert not all(torch.equal(state[k], v) for k, v in build_segmenter(SegmenterSettings(), 1).state_dict().items())
    record = json.loads(provenance_path(out).read_text())
    assert record["steps"] == 3 and record["deform"] is True and record["public_maps"] == 8
    assert len(record["public_maps_sha256"]) == 64 and record["image_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S.pt", "S.pt.json"]  # no temp files left


def test_cli_names_a_folder_without_label_maps(tmp_path, capsys):
    assert main(["--public", str(tmp_path), "--out", str(tmp_path / "S.pt"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "public label maps" in err
    assert not (tmp_path / "S.pt").exists()
