"""A hospital without labels, end to end, on Flower's deployment engine (127.0.0.1, TLS, node keys).

docs/recipes/restore-diffusion.md, "A hospital without labels", step by step: the
coordinator (``medgen-server start`` / ``register-node`` / ``run``) and ONE hospital whose
site folder is a PACS-like export of CT DICOM series in HU (real CT pixels: pydicom's
CT_small through sim/dicom_export.py's ``real_ct_hu``, with noise; ``[labels] none =
true``, no labels/ folder), joined with ``medgen-client`` (warm trainer, its own
``--epsilon-cap``). The helpers, the PKI commands and the process handling (every process
an ``OwnedProcess``, stopped by PID in teardown) are tests/deploy/test_e2e.py's.

1. restore-diffusion (denoise) trains one real round there; the ledger records the
   spending, planned for and within the hospital's cap (tighter than the run's target).
2. A map-conditioned run (dp-cgan) at the same node (resolved from ITS node-config.toml,
   through ``answer``, the function the warm trainer runs) is answered with the
   SITE_DATA_REFUSED error naming the missing label maps, the ledger byte-identical. Not a
   second deployed run: an error reply travels to the coordinator exactly as the
   allow-list refusal test_e2e.py checks, and one more ``medgen-server run`` costs tens of
   minutes on the shared host; the node-level refusal on NIfTI is
   tests/client/test_own_data_path.py's ``..._dp_cgan_refuses_it_before_the_ledger``.
3. The hospital applies the finished run to one of its own series with ``medgen-client
   restore --run-dir <the coordinator's run folder, copied> --state <its node folder>``:
   a valid CT series comes back (pydicom reads it, the modality LUT gives HU near the
   input's, same geometry, new UIDs), only that series, and every input file is
   byte-identical after training AND restoring. A folder whose dataset.toml window differs
   from the one the node trained on is refused through ``--state`` (the run names no data).

Mutations that fail it: dropping ``check_site`` (dp-cgan trains or fails otherwise: the
code, the reason or the ledger bytes differ); the restore writing the input's UIDs or dropping the
rescale; ``--state`` not reading the node's manifest (the other-window folder is restored).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, RecordDict
from pydicom.pixels import apply_modality_lut

from medgen.client.codes import SITE_DATA_REFUSED
from medgen.client.node import resolve_node
from medgen.client.rounds import answer
from medgen.config import RunConfig
from medgen.models.registry import build_recipe
from medgen.deploy.launch import FlwrClient, ServerState, flower_env, wait_for_port
from medgen.server.simulate import free_port
from medgen.sim.dicom_export import real_ct_hu, write_series
from test_e2e import ROUND_TIMEOUT, Federation, _cli, _medgen_server, _wait  # tests/deploy/test_e2e.py (same folder)

pytestmark = pytest.mark.slow

SIZE, NOISE_HU, CAP = 32, 40.0, 4.0
TOKEN_LOST = "Runtime task-token authentication failed"
STARTUP = 600  # s: `medgen-server start` imports torch; on the shared 2-core host (load 30) it took > 90 s
CT_TOML = """[dataset]
modality = "CT"
dims = 2

[intensity]
units = "HU"
normalisation = "window"
window = [-1000, 2000]

[labels]
"""
RUN_TOML = """\
recipe = "{recipe}"
sites = "A"
min-sites = 1
num-rounds = 1
local-steps = 2
batch-size = 2
image-size = 32
accountant = "rdp"
target-epsilon = 8.0
eval-every = 0
round-timeout = 900.0
label-names = "background,soft_tissue,bone"

[options]
{options}
"""
OPTIONS = {"dp-cgan": 'gen-width = 4\ndisc-width = 4\nnoise-dim = 8\nspade-hidden = 4',
           "restore-diffusion": 'task = "denoise"\nchannels = "8,16"\nnorm-groups = 4\nsample-steps = 2'}


def write_hospital(site: Path) -> None:
    """Four patients, one CT DICOM series each (2 slices, 32 px, stored HU), no labels."""
    clean, spacing = real_ct_hu(SIZE, 2)
    rng = np.random.default_rng(0)
    for p in range(4):
        noisy = np.rint(np.roll(clean, 2 * p, axis=1) + rng.normal(0.0, NOISE_HU, clean.shape))
        write_series(noisy, spacing, site / "images" / f"patient{p}", modality="CT", patient_id=f"PAT-{p}",
                     seed=p, origin=(-60.0, 12.5, 30.0 + p))
    (site / "dataset.toml").write_text(CT_TOML + "none = true\n")


def write_public_bank(public: Path) -> None:
    """The federation's public label maps (no patient data); the label-free recipe never reads them."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    (public / "labels").mkdir(parents=True)
    for i in range(3):
        r = np.hypot(yy * (1 + 0.1 * i), xx)
        labels = np.zeros((SIZE, SIZE), np.uint8)
        labels[r < 14], labels[r < 11] = 20, 10
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(public / "labels" / f"public{i}.nii.gz"))
    (public / "dataset.toml").write_text(CT_TOML + 'names = ["background", "soft_tissue", "bone"]\n'
                                         "values = [0, 10, 20]\n")


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_series(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    datasets = sorted((pydicom.dcmread(f) for f in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([np.asarray(apply_modality_lut(d.pixel_array, d), np.float64) for d in datasets], -1), datasets


def client(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(_cli("medgen-client", *args), env=flower_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """A coordinator's SuperLink and hospital A (unlabelled CT DICOM) online, as in test_e2e."""
    root = tmp_path_factory.mktemp("unlabelled")
    data, pki, keys = root / "data", root / "pki", root / "keys"
    write_hospital(data / "sites" / "A")
    write_public_bank(data / "public")
    _medgen_server("pki", "ca", "--out", pki / "ca")
    _medgen_server("pki", "server-cert", "--ca", pki / "ca", "--out", pki / "server",
                   "--host", "localhost", "--host", "127.0.0.1")
    _medgen_server("pki", "node-key", "--out", keys, "--name", "site-A")
    fed = Federation(root, data, pki, keys, ServerState(root / "server-state"), free_port())
    try:
        # test_e2e's start_server (docs/deployment.md, coordinator step 2), waiting longer for the port
        fed.link = fed.own(_cli("medgen-server", "start", "--certs", pki / "server", "--ca", fed.ca_cert,
                                "--state", fed.state.root, "--host", "127.0.0.1", "--port", fed.port),
                           "superlink.log")
        wait_for_port("127.0.0.1", fed.port, STARTUP, fed.link)
        _medgen_server("register-node", keys / "site-A.pub", "--state", fed.state.root)
        node = fed.start_hospital("A", "--epsilon-cap", CAP)
        _wait(lambda: FlwrClient(fed.state).online_nodes() == 1, STARTUP, "hospital A online", [fed.link, node])
        yield fed
    finally:
        fed.stop_all()
        left = [p.pid for p in fed.processes if p.running()]
        assert not left, f"processes still running after teardown: {left}"


def write_run_toml(fed: Federation, recipe: str) -> Path:
    config = fed.root / f"{recipe}.toml"
    config.write_text(RUN_TOML.format(recipe=recipe, options=OPTIONS[recipe]))
    return config


def deployed_run(fed: Federation, recipe: str) -> tuple[int, Path]:
    """``medgen-server run`` of a 1-round run of ``recipe``: (exit status, run folder)."""
    config = write_run_toml(fed, recipe)
    run_dir = fed.root / "runs" / recipe
    runner = fed.own(_cli("medgen-server", "run", "--config", config, "--state", fed.state.root, "--out", run_dir),
                     f"run-{recipe}.log")
    deadline = time.monotonic() + 2 * ROUND_TIMEOUT
    while (status := runner.wait(5)) is None and time.monotonic() < deadline:
        # Flower's ServerApp must activate within 30 s of its task claim; on an overloaded host
        # it may not, and then `run` waits forever (docs/deployment.md, "A very slow coordinator host")
        assert TOKEN_LOST not in fed.link.log_text(), \
            f"the ServerApp lost its Flower task token (host too loaded?): {fed.link.log_path}"
    assert status is not None, f"medgen-server run ({recipe}) did not end:\n{runner.log_text()[-3000:]}"
    return status, run_dir


def train_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("kind") == "train"]


def test_an_unlabelled_dicom_hospital_trains_restoration_is_refused_dp_cgan_and_restores_its_own_series(hospital):
    fed = hospital
    site = fed.data / "sites" / "A"
    before = digests(site)
    ledger_path = fed.root / "hospitals" / "A" / "privacy_ledger.json"

    # 1. the label-free restoration recipe trains there, for real, within the hospital's cap
    status, run_dir = deployed_run(fed, "restore-diffusion")
    assert status == 0, (run_dir / "metrics.jsonl").read_text()
    [record] = train_records(run_dir)
    assert sorted(record["per_site"]) == ["A"] and not record["excluded"], record
    ledger = json.loads(ledger_path.read_text())
    assert ledger["plan"]["target_epsilon"] == pytest.approx(CAP)  # the site's cap, not the run's 8.0
    [entry] = ledger["rounds"]
    assert entry["steps"] == 2 and 0 < entry["epsilon"] <= CAP
    assert record["per_site"]["A"]["epsilon"] == pytest.approx(entry["epsilon"])
    assert json.loads((run_dir / "DONE").read_text())["status"] == "ok"

    # 2. a map-conditioned recipe at the same node (its own node-config.toml): refused at plan
    # time, the ledger byte-identical (in-process: the deployed Error path is test_e2e's allow-list one)
    refused = RunConfig.from_toml(write_run_toml(fed, "dp-cgan"))
    node = resolve_node(refused, tomllib.loads((fed.root / "hospitals" / "A" / "node-config.toml").read_text()))
    recipe = build_recipe(refused)
    request = RecordDict({"arrays": ArrayRecord(recipe.shared_state(recipe.build())),
                          "config": ConfigRecord({"run-key": "refused-dp-cgan", "absolute-round": 1, "server-round": 1})})
    ledger_bytes = ledger_path.read_bytes()
    reply = answer("train", refused, node, request)
    assert isinstance(reply, Error) and reply.code == SITE_DATA_REFUSED, reply
    assert "dp-cgan" in reply.reason and "no labels" in reply.reason and "before any privacy budget" in reply.reason
    assert ledger_path.read_bytes() == ledger_bytes

    # 3. the coordinator hands over the finished run (DP releases only); the hospital restores one series
    received = fed.root / "hospitals" / "received-run"
    received.mkdir()
    for name in ("config.toml", "checkpoint.pt", "DONE"):
        shutil.copy2(run_dir / name, received / name)
    state, out = fed.root / "hospitals" / "A", fed.root / "restored"
    done = client("restore", site, "--run-dir", received, "--state", state, "--series", "patient1",
                  "--task", "denoise", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "site A" in done.stdout
    assert sorted(p.name for p in (out / "images").iterdir()) == ["patient1"]  # only that series
    source_hu, source = read_series(site / "images" / "patient1")
    out_hu, restored = read_series(out / "images" / "patient1")
    assert out_hu.shape == source_hu.shape
    for a, b in zip(source, restored):
        assert b.Modality == "CT" and b.RescaleType == "HU" and "restored" in b.SeriesDescription
        assert (b.Rows, b.Columns) == (a.Rows, a.Columns)
        assert list(b.ImageOrientationPatient) == list(a.ImageOrientationPatient)
        assert np.allclose([float(v) for v in b.ImagePositionPatient], [float(v) for v in a.ImagePositionPatient])
        assert np.allclose([float(v) for v in b.PixelSpacing], [float(v) for v in a.PixelSpacing])
        for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert getattr(b, uid) != getattr(a, uid), uid
        assert b.PatientID != a.PatientID
    assert len({d.SOPInstanceUID for d in restored}) == len(restored)
    body = source_hu > -700
    assert abs(out_hu[body].mean() - source_hu[body].mean()) < 30  # HU stay HU
    assert out_hu[body].std() > 100  # an image, not a constant

    # a folder in another CT window than the node trained on: refused by --state, nothing written
    other = fed.root / "other-window"
    shutil.copytree(site, other)
    (other / "dataset.toml").write_text((site / "dataset.toml").read_text().replace("[-1000, 2000]", "[-200, 300]"))
    refused = client("restore", other, "--run-dir", received, "--state", state, "--out", fed.root / "refused")
    assert refused.returncode == 2 and "[intensity] window" in refused.stderr, refused.stderr
    assert str(site.resolve() / "dataset.toml") in refused.stderr and not (fed.root / "refused").exists()

    assert digests(site) == before  # training and restoring only read the hospital's files
