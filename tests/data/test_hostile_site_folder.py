"""Issue 13 failures 1-5: a hostile site folder cannot inflate the privacy unit or hang the node.

The folder of the issue: 16 patients, ``images/loop -> .`` plus ``labels/loop -> .``, a
link out of the folder, a FIFO, an unreadable file, a NaN image, a constant image and a
mis-shaped label map. ``data check`` and training must both count 16 - 4 = 12 distinct
patients, name every bad entry relative to the site, never block on the FIFO, and leave
every file and link exactly as they were.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import pwd
import select
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from medgen.data.data_check import check_folder
from medgen.data.data_check import main as data_check
from medgen.data.site_data import SiteDataError, load_site
from medgen.sim.dicom_export import export_site_as_dicom

torch.set_num_threads(1)

PATIENTS = 16
BAD = {"p12": "non-finite", "p13": "constant", "p14": "has shape", "p15": "cannot be read"}


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` by lstat, never following a link or opening a special
    file: regular files by content hash and mtime, links by their target text."""
    state = {}
    for folder, dirs, names in os.walk(root):  # followlinks=False: loops are not entered
        for name in sorted(dirs + names):
            path = Path(folder) / name
            info = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISREG(info.st_mode):
                state[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(),
                              info.st_size, info.st_mtime_ns, stat.S_IMODE(info.st_mode))
            elif stat.S_ISLNK(info.st_mode):
                state[rel] = ("link", os.readlink(path))
            else:
                state[rel] = (stat.S_IFMT(info.st_mode), info.st_mtime_ns, stat.S_IMODE(info.st_mode))
    return state


def within(seconds: float, call):
    """``call()``, or a test failure if it blocks (a FIFO opened for reading blocks forever)."""
    result: dict = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: blocked (on a FIFO?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def deny_reading(monkeypatch, path: Path) -> None:
    """Make ``path`` unreadable as it is for a node not running as root (tests run as root,
    which reads every file): any open of it raises PermissionError, as the kernel would."""
    target = os.path.abspath(path)
    real_open, real_os_open = builtins.open, os.open

    def denied(file) -> bool:
        return isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(file)) == target

    def guarded_open(file, *args, **kwargs):
        if denied(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    def guarded_os_open(file, *args, **kwargs):
        if denied(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)


def build_hostile_site(root: Path, files) -> tuple[Path, Path]:
    """The issue's folder under ``root/site``, plus a folder of 3 patients outside it."""
    site, outside = root / "site", root / "elsewhere"
    for k in range(PATIENTS):
        image, labels = files.phantom(16, seed=k)
        image = image.astype(np.float32)
        if k == 12:
            image[4, 4] = np.nan
        if k == 13:
            image[:] = 300.0
        files.write_nifti(site / "images" / f"p{k:02d}.nii.gz", image)
        files.write_nifti(site / "labels" / f"p{k:02d}.nii.gz", labels[:12] if k == 14 else labels)
    for k in range(3):
        image, labels = files.phantom(16, seed=100 + k)
        files.write_nifti(outside / f"x{k}.nii.gz", image)
    os.symlink(".", site / "images" / "loop")
    os.symlink(".", site / "labels" / "loop")
    os.symlink(outside, site / "images" / "outside")
    os.symlink(site / "images" / "p00.nii.gz", site / "images" / "p00_again.nii.gz")
    os.mkfifo(site / "images" / "pipe.nii.gz")  # named like an image, to tempt a reader
    return site, outside


@pytest.fixture
def hostile_site(tmp_path, files):
    return build_hostile_site(tmp_path, files)


def test_data_check_and_training_count_the_same_distinct_patients(hostile_site, tmp_path,
                                                                  monkeypatch):
    site, outside = hostile_site
    before, before_outside = tree_state(site), tree_state(outside)
    deny_reading(monkeypatch, site / "images" / "p15.nii.gz")

    report = within(60, lambda: check_folder(site))
    data = within(60, lambda: load_site(site, 16, cache_dir=tmp_path / "cache"))
    again = within(60, lambda: load_site(site, 16, cache_dir=tmp_path / "cache"))  # cache hit

    expected = PATIENTS - len(BAD)
    assert report.patients == report.usable == data.num_patients == again.num_patients == expected
    assert data.images.shape[0] == expected and data.has_labels and report.trains
    assert sorted(r.item for r in report.rows if r.status == "usable") == \
        [f"images/p{k:02d}.nii.gz" for k in range(expected)]
    reasons = {s.reason.split(": ", 1)[0]: s.reason for s in data.skipped}
    assert {r.item for r in report.skipped} == set(reasons)
    for name, fragment in BAD.items():
        assert fragment in reasons[f"images/{name}.nii.gz"]
    for link in ("images/loop", "labels/loop", "images/outside", "images/p00_again.nii.gz"):
        assert "symbolic link, not followed" in reasons[link]
    assert "FIFO (named pipe), not a regular file: never opened" in reasons["images/pipe.nii.gz"]
    assert all(str(tmp_path) not in s.reason for s in data.skipped)  # relative paths only
    monkeypatch.undo()
    assert tree_state(site) == before and tree_state(outside) == before_outside


def test_old_failure_one_unreadable_file_no_longer_takes_the_site_down(good_site, files,
                                                                        monkeypatch, tmp_path):
    """Failure 3: the cache key opened every file before per-file error handling."""
    deny_reading(monkeypatch, good_site / "labels" / "vol.nii.gz")
    data = load_site(good_site, 16, cache_dir=tmp_path / "cache")
    assert data.num_patients == 3  # vol's label map cannot be read: vol alone is skipped
    [image, label] = sorted(s.reason for s in data.skipped)
    assert image.startswith("images/vol.nii.gz: no label map: labels/vol.nii.gz was skipped")
    assert label.startswith("labels/vol.nii.gz: cannot be read (Permission denied)")


def test_labels_of_one_record_are_its_own(hostile_site):
    """Failure 2: one image without a label map is skipped alone; the rest keep labels."""
    site, _ = hostile_site
    (site / "labels" / "p03.nii.gz").unlink()
    os.unlink(site / "images" / "pipe.nii.gz")
    data = load_site(site, 16)
    report = check_folder(site)
    assert data.has_labels and data.num_patients == report.patients == PATIENTS - 3 - 1  # p15 readable here
    assert "images/p03.nii.gz" in {r.item for r in report.skipped}
    assert any(s.reason.startswith("images/p03.nii.gz: no label map") for s in data.skipped)


def test_a_fifo_in_a_dicom_series_folder_is_named_and_never_opened(tmp_path, files):
    """Failure 5: training hung when a FIFO sat in a DICOM series folder."""
    nifti = tmp_path / "nifti"
    for k in range(3):
        image, labels = files.phantom(16, seed=k)
        files.write_nifti(nifti / "images" / f"s{k}.nii.gz", image)
        files.write_nifti(nifti / "labels" / f"s{k}.nii.gz", labels)
    export_site_as_dicom(nifti, tmp_path / "dicom")
    site = tmp_path / "dicom"
    os.mkfifo(site / "images" / "s1" / "IM_PIPE")
    os.symlink("/etc", site / "images" / "s2" / "etc")
    before = tree_state(site)
    data = within(60, lambda: load_site(site, 16))
    report = within(60, lambda: check_folder(site))
    assert data.num_patients == report.patients == 3  # the series itself is intact
    reasons = {s.reason.split(": ", 1)[0]: s.reason for s in data.skipped}
    assert "FIFO (named pipe)" in reasons["images/s1/IM_PIPE"]
    assert "symbolic link, not followed" in reasons["images/s2/etc"]
    assert {r.item for r in report.skipped} == set(reasons)
    assert tree_state(site) == before


def test_copies_and_links_of_one_patient_count_once(tmp_path, files):
    site = tmp_path / "site"
    for k in range(3):
        image, labels = files.phantom(16, seed=k)
        files.write_nifti(site / "images" / f"p{k}.nii.gz", image)
        files.write_nifti(site / "labels" / f"p{k}.nii.gz", labels)
    shutil.copyfile(site / "images" / "p0.nii.gz", site / "images" / "p0_copy.nii.gz")
    shutil.copyfile(site / "labels" / "p0.nii.gz", site / "labels" / "p0_copy.nii.gz")
    os.link(site / "images" / "p1.nii.gz", site / "images" / "p1_hardlink.nii.gz")
    shutil.copyfile(site / "labels" / "p1.nii.gz", site / "labels" / "p1_hardlink.nii.gz")
    data, report = load_site(site, 16), check_folder(site)
    assert data.num_patients == report.patients == 3
    reasons = {s.reason.split(": ", 1)[0]: s.reason for s in data.skipped}
    assert "the same bytes as images/p0.nii.gz" in reasons["images/p0_copy.nii.gz"]
    assert "the same bytes as images/p1.nii.gz" in reasons["images/p1_hardlink.nii.gz"]


def test_images_folder_that_is_a_link_is_refused_with_what_to_do(tmp_path, files):
    real = tmp_path / "real"
    files.write_nifti(real / "a.nii.gz", files.phantom(16)[0])
    (tmp_path / "site").mkdir()
    os.symlink(real, tmp_path / "site" / "images")
    with pytest.raises(SiteDataError, match="images/ is a symbolic link"):
        load_site(tmp_path / "site", 16)
    assert not check_folder(tmp_path / "site").trains
    # the site folder itself may be a link: the hospital chose that path
    shutil.copytree(real, tmp_path / "target" / "images")
    os.symlink(tmp_path / "target", tmp_path / "linked_site")
    assert load_site(tmp_path / "linked_site", 16).num_patients == 1


def _nobody() -> int | None:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


def _as_unprivileged_user(call, uid: int | None, seconds: float = 120):
    """``call()`` in a forked child that dropped to ``uid`` (None: stay), its JSON result.

    Forked, not exec'd: the interpreter may live where an unprivileged user cannot read
    (/root/.pyenv here); every module the call needs is already imported by the parent.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, run, report, exit without cleanup handlers
        os.close(read_end)
        status = 0
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            payload = json.dumps({"value": call()})
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            payload, status = json.dumps({"error": f"{type(err).__name__}: {err}"}), 1
        with os.fdopen(write_end, "w") as out:
            out.write(payload)
        os._exit(status)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], seconds)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the unprivileged node blocked for {seconds} s")
    with os.fdopen(read_end) as result:
        text = result.read()
    os.waitpid(pid, 0)
    return json.loads(text)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork and permissions")
def test_an_unreadable_file_for_a_real_non_root_node(files):
    """Failure 3 without simulation: the node runs as an unprivileged user, a file is 0o000."""
    uid = _nobody() if os.geteuid() == 0 else None
    if os.geteuid() == 0 and uid is None:
        pytest.skip("no unprivileged user to run the node as")
    root = Path(tempfile.mkdtemp(prefix="medgen-perm-", dir="/tmp"))
    try:
        site, cache = root / "site", root / "cache"
        for k in range(3):
            image, labels = files.phantom(16, seed=k)
            files.write_nifti(site / "images" / f"p{k}.nii.gz", image)
            files.write_nifti(site / "labels" / f"p{k}.nii.gz", labels)
        load_site(site, 16), check_folder(site)  # every module the child needs, imported now
        for folder, _, names in os.walk(root):
            os.chmod(folder, 0o755)
            for name in names:
                os.chmod(Path(folder) / name, 0o644)
        os.chmod(root, 0o711)
        cache.mkdir()
        os.chmod(cache, 0o777)  # the node's own state folder, not the site's
        os.chmod(site / "images" / "p1.nii.gz", 0o000)

        def node():
            data = load_site(site, 16, cache_dir=cache)
            return [data.num_patients, check_folder(site).patients,
                    [s.reason for s in data.skipped]]

        result = _as_unprivileged_user(node, uid)
        assert "error" not in result, result
        patients, checked, reasons = result["value"]
        assert patients == checked == 2
        assert reasons == ["images/p1.nii.gz: cannot be read (Permission denied); give the user "
                           "the node runs as read access, or move the file out of the site folder",
                           "labels/p1.nii.gz: not used: its image images/p1.nii.gz was skipped "
                           "(see its reason)"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_data_check_cli_on_the_hostile_folder(hostile_site, capsys, monkeypatch):
    site, _ = hostile_site
    deny_reading(monkeypatch, site / "images" / "p15.nii.gz")
    assert within(60, lambda: data_check([str(site), "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["patients"] == report["usable"] == PATIENTS - len(BAD) and report["trains"]
