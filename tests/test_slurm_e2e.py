"""e2e: Slurm jobs that ask for an OS get it. One shared lab for the module
(tests/test_slurm_e2e_support.py): real munged and slurmctld inside the lab namespace, QEMU nodes
g1 and g2 running images built by `fg-image-generate -slurm` (slA and slB, which differ only in
IMAGE_ID) and slX, whose boot fails. Both nodes boot slA once (at once), then the tests run in
file order, each starting from the node states the previous one left (run the module whole):

1. `sbatch --constraint=nosuch` is refused at submit; nothing is provisioned.
2. `sbatch --constraint=slB -w g1`: slurmctld asks g1's slurmd to reboot with feature slB -> the
   helper (node side, from the image) sets g1's next boot to slB through the node API,
   RebootProgram asks the server to reboot it (a run that power-cycles g1 over IPMI) -> g1
   PXE-boots slB, fetches the munge key with its new token, slurmd registers with slB -> the job
   runs there: its output (sent to the node's console) shows IMAGE_ID=slB.
3. Two jobs asking for different OSes on the two-node partition, each on the node that does not
   run its OS yet (g1 slB -> slA, g2 slA -> slB): both nodes re-image at once, both jobs
   complete, each output shows its image.
4. `sbatch --constraint=slX -w g1`: g1's re-image fails in the initramfs; the run driver's hook
   sets g1 DOWN with dynprov's reason well within ResumeTimeout (`scontrol show node` Reason).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_site
from tests.test_slurm_e2e_support import (
    BROKEN,
    BROKEN_REASON,
    RESUME_TIMEOUT,
    SlurmLab,
    build_images,
    console_job_script,
    slurm_lab_up,
    wait_for,
)

pytestmark = pytest.mark.e2e

JOB_TIMEOUT = 900


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[SlurmLab]:
    images = build_images(tmp_path_factory.mktemp("slurm-images"))
    site = make_site(tmp_path_factory.mktemp("slurm-site") / "site")
    with slurm_lab_up(site, images, nodes=("g1", "g2")) as lab:
        yield lab


@pytest.fixture(scope="module")
def job(slurm: SlurmLab) -> Path:
    return console_job_script(slurm.ctl.base / "job.sh")


def _runs(slurm: SlurmLab) -> int:
    from pxe import db

    conn = db.connect(slurm.site.cfg.db_path)
    try:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    finally:
        conn.close()


def test_a_constraint_no_image_provides_is_refused_at_submit(slurm: SlurmLab, job: Path) -> None:
    before = _runs(slurm)
    sb = slurm.ctl.run("sbatch", "--constraint=nosuch", "--output=/dev/null", str(job))
    assert sb.returncode != 0, sb.stdout
    assert "Invalid feature specification" in sb.stderr, sb.stderr
    assert slurm.ctl.run("squeue", "-h").stdout.strip() == ""
    assert _runs(slurm) == before  # nothing provisioned
    assert slurm.ctl.node("g1") == ("idle", "slA") and slurm.ctl.node("g2") == ("idle", "slA")


def test_sbatch_constraint_reimages_the_node_and_the_job_runs_in_b(slurm: SlurmLab,
                                                                   job: Path) -> None:
    t1 = time.monotonic()
    job_id = slurm.ctl.submit(job, "--constraint=slB", "--nodelist=g1")
    state = slurm.ctl.wait_job(job_id, JOB_TIMEOUT)
    took = time.monotonic() - t1
    assert state == "COMPLETED", slurm.ctl.log_tail()
    assert slurm.ctl.node("g1")[1] == "slB"
    out = slurm.job_output("g1", job_id)
    assert "IMAGE_ID=slB" in out and "IMAGE_ID=slA" not in out, out
    console = slurm.console("g1")
    assert "dynprov: image slB is up" in console
    # the key came over the token channel, then munged and slurmd, then ready
    after = console.split("switch_root")[-1]
    assert after.index("written: /etc/munge/munge.key") \
        < after.index("dynprov: slurm: munged and slurmd started")
    print(f"sbatch --constraint=slB -> job done in slB: {took:.1f} s")


def test_two_jobs_for_different_oses_on_two_nodes_both_complete(slurm: SlurmLab,
                                                                job: Path) -> None:
    assert slurm.ctl.node("g1") == ("idle", "slB") and slurm.ctl.node("g2") == ("idle", "slA")
    t0 = time.monotonic()
    jobs = {("g1", "slA"): slurm.ctl.submit(job, "--constraint=slA", "--nodelist=g1"),
            ("g2", "slB"): slurm.ctl.submit(job, "--constraint=slB", "--nodelist=g2")}
    for (node, label), job_id in jobs.items():
        state = slurm.ctl.wait_job(job_id, JOB_TIMEOUT)
        assert state == "COMPLETED", (node, label, slurm.ctl.job(job_id), slurm.ctl.log_tail())
    took = time.monotonic() - t0
    for (node, label), job_id in jobs.items():
        out = slurm.job_output(node, job_id)
        assert f"IMAGE_ID={label}" in out and out.count("IMAGE_ID=") == 1, (node, out)
        assert slurm.ctl.node(node) == ("idle", label)
        assert slurm.ctl.job(job_id)["NodeList"] == node
    # both were re-imaged (a reboot each), not served by the node that already ran the OS
    assert slurm.console("g1").count("dynprov: image slA is up") == 2
    assert slurm.console("g2").count("dynprov: image slB is up") == 1
    print(f"two jobs, two nodes re-imaged at once (slB->slA, slA->slB): {took:.1f} s")


def test_a_failed_reimage_sets_the_node_down_with_dynprovs_reason(slurm: SlurmLab,
                                                                  job: Path) -> None:
    t0 = time.monotonic()
    job_id = slurm.ctl.submit(job, f"--constraint={BROKEN}", "--nodelist=g1")
    try:
        wait_for(lambda: slurm.ctl.node_fields("g1").get("State", "").startswith("DOWN"),
                 "g1 DOWN in Slurm", RESUME_TIMEOUT - 60, 2)
        took = time.monotonic() - t0
        fields = slurm.ctl.node_fields("g1")
        # dynprov's reason (the initramfs' own words), not slurmctld's "reboot timed out"
        assert fields["Reason"].startswith(f"dynprov: {BROKEN_REASON}"), fields
        assert took < RESUME_TIMEOUT, took
        assert f"dynprov: FAILED: {BROKEN_REASON}" in slurm.console("g1")
        assert slurm.ctl.job_state(job_id) not in ("RUNNING", "COMPLETED")
        assert slurm.ctl.node("g2") == ("idle", "slB")  # the other node is untouched
        print(f"sbatch --constraint={BROKEN} -> g1 DOWN with dynprov's reason: {took:.1f} s "
              f"(ResumeTimeout {RESUME_TIMEOUT} s)")
    finally:
        slurm.ctl.run("scancel", job_id)
