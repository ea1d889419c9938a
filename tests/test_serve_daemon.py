"""`pxe-stage serve` as a whole: settings checked key by key, the worker processes (start, crash,
stop, the shared transfer cap), metrics, systemd readiness, and the standard servers' configs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

import httpx
import pytest
from test_serve_support import (
    LOOPBACK,
    RawClient,
    curl_tftp,
    free_port,
    parse_metrics,
    put,
    serve_process,
    serve_section,
    wait_for,
)

from pxe.errors import InputError
from pxe.serve import metrics, settings


# -- settings ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_defaults_follow_the_site(site):
    s = settings.load(site.cfg)
    assert (s.tftp_address, s.tftp_port) == ("198.18.0.1", 69)
    assert (s.http_address, s.http_port) == ("198.18.0.1", site.cfg.boot.http_port)
    assert s.tftp and s.http and s.max_transfers > 128 and s.retries >= 1


@pytest.mark.unit
@pytest.mark.parametrize("key,value", [
    ("tftp_port", 0), ("tftp_port", 70000), ("tftp_port", '"69"'), ("http_port", "true"),
    ("max_transfers", 0), ("timeout", 0), ("timeout", '"1s"'), ("retries", -1),
    ("tftp_workers", 0), ("max_blksize", 100000), ("tftp_address", '"not-an-ip"'),
    ("tftp_address", '"::"'), ("http_address", '"198.18.0.1.5"'), ("tftp", '"yes"'),
    ("standard_configs_dir", '"relative/dir"'), ("bogus", 1),
])
def test_bad_values_name_the_key(site, key, value):
    with open(site.config_path, "a") as fh:
        fh.write(f"\n[serve]\n{key} = {value}\n")
    with pytest.raises(InputError) as err:
        settings.load(site.cfg)
    assert f"serve.{key}" in str(err.value)
    proc = site.run("serve", "--check")
    assert proc.returncode == 2 and f"serve.{key}" in proc.stderr


@pytest.mark.unit
def test_nothing_to_serve(site):
    proc = site.run("serve", "--no-tftp", "--no-http", "--check")
    assert proc.returncode == 2 and "nothing to serve" in proc.stderr


@pytest.mark.unit
def test_check_prints_the_effective_settings(site):
    serve_section(site, tftp_port=6969, retries=3)
    proc = site.run("serve", "--check", "--http-port", "8181", check=True)
    assert "tftp_port = 6969" in proc.stdout and "http_port = 8181" in proc.stdout
    assert "retries = 3" in proc.stdout


# -- metrics -----------------------------------------------------------------------------------
@pytest.mark.unit
def test_counters_are_summed_over_rows_and_rendered():
    c = metrics.Counters(3)
    done = metrics.slot("dynprov_tftp_transfers_total", "complete")
    c.row(0).add(done, 2)
    c.row(2).add(done, 5)
    local = c.row(1).load()
    local[metrics.slot("dynprov_tftp_active_transfers")] = 4
    c.row(1).store(local)
    parsed = parse_metrics(c.render())
    assert parsed['dynprov_tftp_transfers_total{result="complete"}'] == 7
    assert parsed["dynprov_tftp_active_transfers"] == 4
    assert c.heartbeat_age(1) is not None and c.heartbeat_age(0) is None
    c.row(1).restart()
    assert parse_metrics(c.render())["dynprov_tftp_active_transfers"] == 0
    assert parse_metrics(c.render())['dynprov_tftp_transfers_total{result="complete"}'] == 7


# -- the daemon --------------------------------------------------------------------------------
def _named(pid: int, prefix: str) -> list[int]:
    from test_serve_support import children_of

    out = []
    for child in children_of(pid):
        try:
            with open(f"/proc/{child}/comm") as fh:
                if fh.read().startswith(prefix):
                    out.append(child)
        except OSError:
            pass
    return out


@pytest.mark.integration
def test_workers_start_serve_and_stop_on_sigterm(site, tmp_path):
    data = os.urandom(50_000)
    put(site.cfg.paths.tftp_root, "pxelinux.0", data)
    with serve_process(site, tftp_workers=2, http_workers=2) as srv:
        tftp_workers = _named(srv.proc.pid, "dynprov-tftp")
        http_workers = _named(srv.proc.pid, "dynprov-http")
        assert len(tftp_workers) == 2 and len(http_workers) == 2
        proc = curl_tftp(srv.tftp_port, "pxelinux.0", tmp_path / "out", 1468)
        assert proc.returncode == 0 and (tmp_path / "out").read_bytes() == data
        m = wait_for(lambda: (m := srv.metrics())
                     and m['dynprov_tftp_transfers_total{result="complete"}'] == 1 and m,
                     "transfer counted")
        assert m["dynprov_tftp_bytes_total"] == len(data)
        assert m["dynprov_tftp_workers_alive"] == 2
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        for pid in tftp_workers + http_workers:
            assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived the supervisor"
    assert "stopping" in srv.log.read_text()


@pytest.mark.integration
def test_a_crashed_worker_is_replaced(site, tmp_path):
    data = os.urandom(20_000)
    put(site.cfg.paths.tftp_root, "pxelinux.0", data)
    with serve_process(site, tftp_workers=2, http_workers=1) as srv:
        victim = _named(srv.proc.pid, "dynprov-tftp-0")[0]
        os.kill(victim, signal.SIGKILL)  # a worker of the serve we started, by its PID
        wait_for(lambda: (new := _named(srv.proc.pid, "dynprov-tftp-0")) and new[0] != victim,
                 "replacement worker")
        for _ in range(4):
            proc = curl_tftp(srv.tftp_port, "pxelinux.0", tmp_path / "out")
            assert proc.returncode == 0 and (tmp_path / "out").read_bytes() == data
        wait_for(lambda: srv.metrics()["dynprov_tftp_workers_alive"] == 2, "both workers alive")
    assert "died" in srv.log.read_text()


@pytest.mark.integration
def test_transfer_cap_holds_across_workers(site, tmp_path):
    data = os.urandom(100_000)
    put(site.cfg.paths.tftp_root, "pxelinux.0", data)
    with serve_process(site, tftp_workers=2, max_transfers=1) as srv:
        holder = RawClient(srv.tftp_port)
        holder.request("pxelinux.0")
        holder.recv()  # holds the only slot (in whichever worker took it)
        for _ in range(4):  # different source ports: both workers see some of these
            with RawClient(srv.tftp_port) as other:
                other.request("pxelinux.0")
        m = wait_for(lambda: (m := srv.metrics())
                     and m['dynprov_tftp_requests_total{result="busy"}'] == 4 and m,
                     "requests turned away")
        assert m["dynprov_tftp_active_transfers"] == 1
        holder.finish(1)
        holder.close()
        wait_for(lambda: srv.metrics()["dynprov_tftp_active_transfers"] == 0, "slot free")
        proc = curl_tftp(srv.tftp_port, "pxelinux.0", tmp_path / "out")
        assert proc.returncode == 0


@pytest.mark.integration
def test_port_in_use_is_one_clear_error(site):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        serve_section(site, tftp_address=LOOPBACK, tftp_port=port, http_address=LOOPBACK,
                      http_port=free_port())
        proc = site.run("serve")
    assert proc.returncode == 1
    assert f"cannot listen for TFTP on 127.0.0.1:{port}" in proc.stderr


@pytest.mark.integration
def test_tells_systemd_when_ready(site, tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        with serve_process(site):
            assert sock.recv(100) == b"READY=1"


@pytest.mark.integration
def test_healthz_and_metrics_format(site):
    with serve_process(site) as srv:
        r = httpx.get(f"{srv.url}/healthz", timeout=10)
        assert (r.status_code, r.text) == (200, "ok\n")
        r = httpx.get(f"{srv.url}/metrics", timeout=10)
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        names = {k.split("{")[0] for k in parse_metrics(r.text)}
        assert {"dynprov_tftp_requests_total", "dynprov_tftp_transfers_total",
                "dynprov_tftp_bytes_total", "dynprov_http_requests_total",
                "dynprov_http_bytes_total", "dynprov_reports_total"} <= names


@pytest.mark.integration
def test_http_only(site, tmp_path):
    with serve_process(site, "--no-tftp") as srv:
        assert not _named(srv.proc.pid, "dynprov-tftp")
        proc = curl_tftp(srv.tftp_port, "x", tmp_path / "out", timeout=3)
        assert proc.returncode != 0
        assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200


# -- configs for the standard servers --------------------------------------------------------
@pytest.mark.integration
def test_render_writes_the_standard_server_configs(site):
    proc = site.run("render", "--no-reload", "--servers", check=True)
    out = site.cfg.paths.state_dir / "servers"
    assert str(out) in proc.stdout
    nginx = (out / "nginx-dynprov.conf").read_text()
    assert f"root {site.cfg.paths.http_root};" in nginx
    assert "listen 198.18.0.1:8080;" in nginx and "location = /report" in nginx
    tftpd = (out / "tftpd-hpa").read_text()
    assert f'TFTP_DIRECTORY="{site.cfg.paths.tftp_root}"' in tftpd
    assert 'TFTP_ADDRESS="198.18.0.1:69"' in tftpd and "--secure" in tftpd
    dnsmasq = (out / "dnsmasq-tftp.conf").read_text()
    assert "enable-tftp" in dnsmasq and f"tftp-root={site.cfg.paths.tftp_root}" in dnsmasq
    if shutil.which("dnsmasq"):
        check = subprocess.run(["dnsmasq", "--test", f"--conf-file={out / 'dnsmasq-tftp.conf'}"],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed")
def test_a_site_nginx_rejects_is_not_written(site, tmp_path):
    from pxe.render import find_template

    packaged = find_template(site.cfg, "servers/nginx-dynprov.conf.j2").path
    nginx = site.cfg.paths.templates_dir / "servers" / "nginx-dynprov.conf.j2"  # a site override
    nginx.parent.mkdir(parents=True)
    nginx.write_text(packaged.read_text().replace("autoindex off;", "autoindex sideways;"))
    proc = site.run("render", "--no-reload", "--servers")
    assert proc.returncode == 1 and "rejected by nginx" in proc.stderr
    assert not (site.cfg.paths.state_dir / "servers" / "nginx-dynprov.conf").exists()


@pytest.mark.integration
@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed")
def test_rendered_nginx_site_serves_and_passes_reports_to_serve(site, tmp_path):
    """nginx with our rendered site on loopback in front of serve: boot files from nginx,
    /report answered by serve."""
    public = free_port()
    text = site.config_path.read_text().replace('server = "198.18.0.1"', 'server = "127.0.0.1"')
    text = text.replace('subnet = "198.18.0.0/24"', 'subnet = "127.0.0.0/24"')
    text = text.replace("198.18.0.100", "127.0.0.100").replace("198.18.0.200", "127.0.0.200")
    site.config_path.write_text(text + f"\n[boot]\nhttp_port = {public}\n")
    put(site.cfg.paths.http_root, "blobs/k", b"kernel bytes")
    with serve_process(site, "--no-tftp") as srv:
        site.run("render", "--no-reload", "--servers", check=True)
        conf = site.cfg.paths.state_dir / "servers" / "nginx-dynprov.conf"
        assert f"proxy_pass http://127.0.0.1:{srv.http_port};" in conf.read_text()
        main = tmp_path / "nginx.conf"
        # user root: pytest's temp dirs are private to root, nginx's default worker is nobody.
        main.write_text(f"user root;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                        f"daemon off;\nevents {{}}\nhttp {{ access_log off; "
                        f"client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;"
                        f" include {conf}; }}\n")
        nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(main)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://{LOOPBACK}:{public}"
            wait_for(lambda: httpx.get(f"{base}/blobs/k", timeout=2).status_code == 200, "nginx")
            assert httpx.get(f"{base}/blobs/k", timeout=5).content == b"kernel bytes"
            r = httpx.post(f"{base}/report", data={"node": "n404", "kind": "booting"}, timeout=10)
            assert r.status_code == 404 and r.text == "unknown node\n"  # serve's answer
            assert httpx.get(f"{base}/healthz", timeout=5).text == "ok\n"
        finally:
            nginx.terminate()
            nginx.wait(10)
