import pytest

from medgen.sim.cli import build_parser, main


def test_help_explains_layout_and_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--seed", "--subjects-per-site", "--image-size", "--sites", "--overwrite"):
        assert option in text
    assert "heldout" in text and "public" in text


def test_build_then_refuse_different_options(tmp_path, capsys):
    args = ["build", "--out", str(tmp_path / "d"), "--seed", "1", "--subjects-per-site", "1",
            "--image-size", "32", "--sites", "A,C", "--public-size", "1", "--heldout-fit", "1",
            "--heldout-test", "1", "--workers", "1"]
    assert main(args) == 0
    assert (tmp_path / "d/sites/C/images/C-0000.nii.gz").is_file()
    assert not (tmp_path / "d/sites/B").exists()
    assert main(args[:4] + ["2"] + args[5:]) == 2  # another seed into the same folder
    assert "overwrite" in capsys.readouterr().err


def test_bad_severity_is_a_usage_error():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build", "--out", "x", "--severity", "B"])
