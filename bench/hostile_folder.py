"""The hostile-folder table (issue 13): what data check and training make of a bad site folder.

Each case is a small site of four labelled 2D NIfTI patients plus one hostile twist (a
symlink loop, a link out of the folder, a FIFO, an unreadable file, NaN voxels, a
mis-shaped label map, ...). For every case the bench runs the product's own code, as a
node would: ``data check`` (client/data_check.py ``check_folder``) and the training loader
(client/site_data.py ``load_site`` with a tensor cache), each guarded by a timeout so a
hang shows as "blocked"; it hashes every file and link target of the folder before and
after (without following links or opening special files). A case passes when data check's
distinct patients == training's == the expected count and the folder is byte-identical.

The unreadable case uses real permissions: the file is mode 000 and, when the bench runs
as root (who reads everything), both calls run in a child process that dropped to the
``nobody`` user, as a node that does not run as root.

    .venv/bin/python -m bench.hostile_folder
        -> bench/results/hostile_folder.json and docs/hostile-site-folders.md
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel
import numpy as np
import torch

from bench.common import write_result
from medgen.data.data_check import check_folder
from medgen.data.site_data import SiteDataError, load_site
from medgen.sim.dicom_export import export_site_as_dicom

DOC = Path(__file__).resolve().parent.parent / "docs" / "hostile-site-folders.md"
GOOD = 4          # labelled patients in every case's base site
SIZE = 16         # image size the loader resizes to
TIMEOUT_S = 60    # a call still running after this is reported as blocked


# ---------------------------------------------------------------------------------------
# the base site and the twists
# ---------------------------------------------------------------------------------------
def phantom(seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2) / (size / 2)
    labels = np.select([radius < 0.3, radius < 0.6, radius < 0.9], [1, 2, 3], 0).astype(np.uint8)
    image = np.array([0, 300, 600, 900])[labels] + rng.integers(0, 50, labels.shape)
    return image.astype(np.float32), labels


def write_nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))


def base_site(site: Path) -> None:
    for k in range(GOOD):
        image, labels = phantom(k)
        write_nifti(site / "images" / f"p{k}.nii.gz", image)
        write_nifti(site / "labels" / f"p{k}.nii.gz", labels)


def replace_image(site: Path, array: np.ndarray) -> None:
    write_nifti(site / "images" / "p3.nii.gz", array)


def _nan(site: Path) -> None:
    image = phantom(3)[0]
    image[5, 5] = np.nan
    replace_image(site, image)


def _inf(site: Path) -> None:
    image = phantom(3)[0]
    image[5, 5] = np.inf
    replace_image(site, image)


def _outside(site: Path) -> None:
    elsewhere = site.parent / "elsewhere"
    for k in range(3):
        write_nifti(elsewhere / f"x{k}.nii.gz", phantom(100 + k)[0])
    os.symlink(elsewhere, site / "images" / "outside")


def _socket(site: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:  # the socket file stays after close
        sock.bind(str(site / "images" / "sock.nii.gz"))


def _dicom_fifo(site: Path) -> None:
    dicom = site.parent / "as-dicom"
    export_site_as_dicom(site, dicom)
    shutil.rmtree(site)
    dicom.rename(site)
    os.mkfifo(site / "images" / "p1" / "IM_PIPE")


def _images_link(site: Path) -> None:
    real = site.parent / "real-images"
    (site / "images").rename(real)
    os.symlink(real, site / "images")


@dataclass(frozen=True)
class Case:
    name: str
    input: str
    expected: int
    twist: Callable[[Path], None]
    expected_text: str
    unreadable: str | None = None  # relative path made mode 000 (the node is not root)


CASES = [
    Case("baseline", "4 labelled patients", GOOD, lambda s: None, "4 patients"),
    Case("symlink loop", "`images/loop -> .` and `labels/loop -> .`", GOOD,
         lambda s: (os.symlink(".", s / "images" / "loop"), os.symlink(".", s / "labels" / "loop")),
         "both links skipped; 4 patients, not 4 x 41"),
    Case("link out of the folder", "`images/outside -> ../elsewhere` (3 more NIfTI)", GOOD, _outside,
         "link skipped; nothing outside read"),
    Case("file link inside", "`images/p0_again.nii.gz -> p0.nii.gz`", GOOD,
         lambda s: os.symlink("p0.nii.gz", s / "images" / "p0_again.nii.gz"),
         "link skipped; p0 counted once"),
    Case("dangling link", "`images/gone.nii.gz -> missing.nii.gz`", GOOD,
         lambda s: os.symlink("missing.nii.gz", s / "images" / "gone.nii.gz"), "link skipped"),
    Case("FIFO", "`images/pipe.nii.gz` is a named pipe", GOOD,
         lambda s: os.mkfifo(s / "images" / "pipe.nii.gz"), "named, never opened; no hang"),
    Case("FIFO in a DICOM series", "site as DICOM series; a FIFO in `images/p1/`", GOOD,
         _dicom_fifo, "named, never opened; the series still reads"),
    Case("socket", "`images/sock.nii.gz` is a Unix socket", GOOD, _socket, "named, never opened"),
    Case("unreadable file", "`images/p3.nii.gz` mode 000, node not root", GOOD - 1,
         lambda s: None, "p3 skipped and named; its label not used", unreadable="images/p3.nii.gz"),
    Case("NaN voxel", "one NaN voxel in p3", GOOD - 1, _nan, "p3 skipped: non-finite"),
    Case("inf voxel", "one inf voxel in p3", GOOD - 1, _inf, "p3 skipped: non-finite"),
    Case("constant image", "p3 has one value everywhere", GOOD - 1,
         lambda s: replace_image(s, np.full((16, 16), 300.0, np.float32)), "p3 skipped: constant"),
    Case("mis-shaped label map", "labels/p3 is 12x16, its image 16x16", GOOD - 1,
         lambda s: write_nifti(s / "labels" / "p3.nii.gz", phantom(3)[1][:12]),
         "p3 skipped: shape named"),
    Case("label values out of range", "labels/p3 holds the value 7", GOOD - 1,
         lambda s: write_nifti(s / "labels" / "p3.nii.gz", phantom(3)[1] * 7 // 3),
         "p3 skipped: values named"),
    Case("image without label map", "labels/p3.nii.gz removed", GOOD - 1,
         lambda s: (s / "labels" / "p3.nii.gz").unlink(), "p3 alone skipped; site keeps labels"),
    Case("no labels/ folder", "labels/ removed", GOOD,
         lambda s: shutil.rmtree(s / "labels"), "4 patients, unlabelled, flagged and warned"),
    Case("label map without image", "an extra labels/p9.nii.gz", GOOD,
         lambda s: write_nifti(s / "labels" / "p9.nii.gz", phantom(9)[1]), "orphan named"),
    Case("byte-identical copy", "`images/p0_copy.nii.gz` = p0's bytes (+ its label)", GOOD,
         lambda s: (shutil.copyfile(s / "images" / "p0.nii.gz", s / "images" / "p0_copy.nii.gz"),
                    shutil.copyfile(s / "labels" / "p0.nii.gz", s / "labels" / "p0_copy.nii.gz")),
         "copy skipped; p0 counted once"),
    Case("hard link", "`images/p1_again.nii.gz` hard link of p1 (+ its label)", GOOD,
         lambda s: (os.link(s / "images" / "p1.nii.gz", s / "images" / "p1_again.nii.gz"),
                    shutil.copyfile(s / "labels" / "p1.nii.gz", s / "labels" / "p1_again.nii.gz")),
         "second name skipped; p1 counted once"),
    Case("corrupt NIfTI", "p3 is 300 random bytes", GOOD - 1,
         lambda s: (s / "images" / "p3.nii.gz").write_bytes(np.random.default_rng(0).bytes(300)),
         "p3 skipped: not readable"),
    Case("empty file", "p3 is 0 bytes", GOOD - 1,
         lambda s: (s / "images" / "p3.nii.gz").write_bytes(b""), "p3 skipped: not readable"),
    Case("images/ is a link", "`images -> ../real-images`", 0, _images_link,
         "refused with what to do"),
]


# ---------------------------------------------------------------------------------------
# running a case
# ---------------------------------------------------------------------------------------
def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry by lstat: files by content hash and mtime, links by target, others by
    type; links are not followed and special files never opened. ``root/cache`` (the
    node's own state, written by design) is left out."""
    state = {}
    for folder, dirs, names in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d != "cache"]
        for name in dirs + names:
            path = Path(folder) / name
            info = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    state[rel] = ("file", hashlib.sha256(handle.read()).hexdigest(), info.st_mtime_ns,
                                  stat.S_IMODE(info.st_mode))
            elif stat.S_ISLNK(info.st_mode):
                state[rel] = ("link", os.readlink(path))
            else:
                state[rel] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return state


def guarded(call: Callable[[], dict]) -> dict:
    """``call()`` in a daemon thread: its result, its error, or "blocked" after TIMEOUT_S."""
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(_capture(call)), daemon=True)
    worker.start()
    worker.join(TIMEOUT_S)
    return out if not worker.is_alive() else {"error": f"blocked for {TIMEOUT_S} s"}


def _capture(call: Callable[[], dict]) -> dict:
    try:
        return call()
    except SiteDataError as err:
        return {"error": "refused: " + str(err).split(": ", 1)[-1].split("\n")[0]}
    except Exception as err:  # noqa: BLE001 - recorded in the table
        return {"error": f"{type(err).__name__}: {err}"}


def node_calls(site: Path, cache: Path) -> dict:
    def check() -> dict:
        report = check_folder(site)
        return {"patients": report.patients, "trains": report.trains, "labelled": report.labelled,
                "skipped": [f"{r.item}: {r.status[len('skipped: '):]}" for r in report.skipped]}

    def train() -> dict:
        data = load_site(site, SIZE, cache_dir=cache)
        return {"patients": data.num_patients, "has_labels": data.has_labels,
                "skipped": [s.reason for s in data.skipped]}

    return {"data_check": guarded(check), "training": guarded(train)}


def as_unprivileged(call: Callable[[], dict], uid: int | None) -> dict:
    """``call()`` in a forked child that dropped to ``uid`` (None: stay), as JSON."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            payload = json.dumps(call())
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            payload = json.dumps({"data_check": {"error": repr(err)}, "training": {"error": repr(err)}})
        with os.fdopen(write_end, "w") as out:
            out.write(payload)
        os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 3 * TIMEOUT_S)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read_end) as result:
        text = result.read() if ready else ""
    os.waitpid(pid, 0)
    blocked = {"error": "blocked"}
    return json.loads(text) if text else {"data_check": blocked, "training": blocked}


def run_case(case: Case, tmp: Path) -> dict:
    root = tmp / case.name.replace(" ", "-").replace("/", "")
    site, cache = root / "site", root / "cache"
    base_site(site)
    case.twist(site)
    if case.unreadable:
        load_site(site, SIZE)  # every module the unprivileged child needs, imported now
        for folder, _, names in os.walk(root):
            os.chmod(folder, 0o755)
            for name in names:
                os.chmod(Path(folder) / name, 0o644)
        cache.mkdir()
        os.chmod(cache, 0o777)  # the node's own state folder
        os.chmod(site / case.unreadable, 0o000)
    before = tree_state(root)
    if case.unreadable:
        uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else None
        outcome = as_unprivileged(lambda: node_calls(site, cache), uid)
    else:
        outcome = node_calls(site, cache)
    unchanged = tree_state(root) == before
    check, train = outcome["data_check"], outcome["training"]
    passed = (check.get("patients", 0) if check.get("trains", False) else 0) == \
        train.get("patients", 0) == case.expected and unchanged and "blocked" not in json.dumps(outcome)
    return {"case": case.name, "input": case.input, "expected": case.expected,
            "expected_text": case.expected_text, "data_check": check, "training": train,
            "byte_identical": unchanged, "pass": passed}


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------
def _verdict(side: dict, labels: bool = False) -> str:
    if "error" in side:
        return side["error"].replace("|", "/")
    text = f"{side['patients']} patients"
    if "trains" in side and not side["trains"]:
        text = "does not train (0)"
    if labels and not side.get("has_labels", True):
        text += ", has_labels False (warned)"
    if not labels and not side.get("labelled", True) and side.get("trains", False):
        text += ", warns: no labels/ folder"
    first = [s for s in side["skipped"] if s]
    if first:
        shown = first[0] if len(first[0]) <= 110 else first[0][:107] + "..."
        text += f"; skipped {len(first)}: `{shown}`"
    return text.replace("|", "/")


def markdown(rows: list[dict]) -> str:
    lines = ["# Hostile site folders: what data check and training make of them",
             "",
             "Generated by `python -m bench.hostile_folder` (issue 13); do not edit by hand.",
             "Each case is four labelled patients plus one twist. Both columns come from the",
             "product's own code (`check_folder`, `load_site`); \"pass\" means data check's",
             "distinct patients = training's = expected and every file and link target of",
             "the folder is byte-identical afterwards. Rules: docs/data-layout.md, \"What medgen",
             "reads in a site folder\".",
             "",
             "| case | input | expected | data check | training | verdict |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        verdict = "pass" if row["pass"] else "FAIL"
        verdict += "" if row["byte_identical"] else " (folder changed!)"
        lines.append(f"| {row['case']} | {row['input']} | {row['expected']}: {row['expected_text']} | "
                     f"{_verdict(row['data_check'])} | {_verdict(row['training'], labels=True)} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medgen-hostile-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # the unprivileged node must reach its case folder
        rows = [run_case(case, Path(tmp)) for case in CASES]
    DOC.write_text(markdown(rows))
    write_result("hostile_folder", {
        "cases": rows, "all_pass": all(r["pass"] for r in rows),
        "seconds": round(time.perf_counter() - start, 1),
        "run_as": "root, unreadable case as nobody" if os.geteuid() == 0 else "non-root user"})
    failed = [r["case"] for r in rows if not r["pass"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} cases pass" + (f"; failed: {failed}" if failed else ""))


if __name__ == "__main__":
    main()
