"""``fg-image-generate -slurm``: an image whose node joins the site's Slurm cluster at boot.

What it adds (besides the Debian packages ``slurmd`` and ``munge``, which the node proves are
installed at boot like every requested package)::

    usr/lib/dynprov/slurm/dynprov-slurm-node     the Slurm face's node side (POSIX sh, busybox
                                                 wget): enroll, helper FEATURE, reboot
    usr/lib/dynprov/slurm/dynprov-slurm-helper   helpers.conf's Helper= (sh fast path)
    usr/lib/dynprov/slurm/dynprov-slurm-reboot   RebootProgram= (dynprov-slurm-node reboot)
    usr/lib/dynprov/slurm/start                  run by the image init before the agent's "ready"
    etc/dynprov/slurm                            ctld=HOST[:PORT] (empty: the provisioning server)
    etc/slurm/slurm.conf, helpers.conf           -slurm-conf FILE (and helpers.conf beside it);
                                                 without it slurmd runs configless
                                                 (--conf-server, SlurmctldParameters=enable_configless)
    etc/systemd/system/slurmd.service.d/dynprov.conf   lets Debian's unit start configless

The munge key is never in the image (the squashfs is served from the public HTTP root): the one
Debian's munge package generates when it is installed is removed here, and ``start`` fetches
the site's with the node's one-time boot token (``dynprov-slurm-node enroll --munge-key`` ->
/node/secret) into /etc/munge/munge.key, mode 0400 owner munge, and enrolls for the node key
the helper uses; only then do munged and slurmd start (directly, or by systemd after the image
init hands over when the image boots systemd).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from pxe import assets, validate
from pxe.bundle import resolve_in_tree
from pxe.errors import DynprovError, InputError
from pxe.imagegen import pack

PACKAGES = ("slurmd", "munge")
TOOLS = f"{pack.DYNPROV}/slurm"
HELPER_PATH = f"/{TOOLS}/dynprov-slurm-helper"
REBOOT_PATH = f"/{TOOLS}/dynprov-slurm-reboot"
MUNGE_KEY = "etc/munge/munge.key"
CONF_MAX = 1 << 20
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_CTLD = re.compile(r"^(?P<host>[A-Za-z0-9.-]{1,253})(?::(?P<port>[0-9]{1,5}))?$")

REBOOT = """#!/bin/sh
# RebootProgram= on a dynprov node: the server reboots it into its next image (power-cycling it
# over IPMI/Redfish when it cannot reboot itself)
exec /usr/lib/dynprov/slurm/dynprov-slurm-node reboot
"""

# The image's own /bin/sh runs this (not busybox): Debian's id, chown, runuser, slurmd.
START = r"""#!/bin/sh
# dynprov -slurm: run by /usr/lib/dynprov/init before the agent reports "ready".
#  1. dynprov-slurm-node enroll --munge-key: the munge key (mode 0400, owner munge) and the node
#     key, both over this boot's one-time token
#  2. slurmd's options: -N <dynprov.node>; configless (--conf-server) without /etc/slurm/slurm.conf
#  3. without systemd: start munged and slurmd here; with systemd their units start them
# Exit 0 ok, 1 failed (the last line says why; the init reports it as "failed").
PATH=/usr/sbin:/usr/bin:/sbin:/bin
D=/usr/lib/dynprov/slurm
fail() { echo "dynprov: slurm: $*"; exit 1; }

node= server=
for word in $(cat /proc/cmdline); do
	case $word in
		dynprov.node=*) node=${word#*=} ;;
		dynprov.server=*) server=${word#*=} ;;
	esac
done
case $node in "" | -* | *[!A-Za-z0-9-]*) fail "no valid dynprov.node= on the kernel command line" ;; esac
$D/dynprov-slurm-node enroll --munge-key || fail "enroll with the provisioning server failed"

ctld=$(sed -n 's/^ctld=//p' /etc/dynprov/slurm 2>/dev/null)
if [ -z "$ctld" ]; then  # the provisioning server's host (http://HOST[:PORT]/...)
	ctld=${server#*://}
	ctld=${ctld%%/*}
	ctld=${ctld%:*}
fi
case $ctld in "" | *[!A-Za-z0-9.:-]*) fail "no slurmctld host (dynprov.server=$server)" ;; esac
opts="-N $node"
[ -s /etc/slurm/slurm.conf ] || opts="$opts --conf-server $ctld"
mkdir -p /etc/default
printf 'SLURMD_OPTIONS="%s"\n' "$opts" > /etc/default/slurmd || fail "cannot write /etc/default/slurmd"
echo "$node" > /etc/hostname
echo "dynprov: slurm: slurmd $opts"

case $(readlink -f /sbin/init 2>/dev/null) in
	*systemd*) echo "dynprov: slurm: munged and slurmd start with systemd"; exit 0 ;;
esac
mkdir -p /run/munge /var/log/munge /var/lib/munge /var/log/slurm /var/spool/slurmd
chown munge:munge /run/munge /var/log/munge /var/lib/munge
runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
# slurmd needs a cgroup hierarchy (cgroup/v2) and, without systemd, IgnoreSystemd=yes
grep -q " /sys/fs/cgroup " /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup \
	|| fail "cannot mount cgroup2 on /sys/fs/cgroup"
# IgnoreSystemd: slurmd makes its scope under system.slice itself, which must exist
mkdir -p /sys/fs/cgroup/system.slice
for dir in /sys/fs/cgroup /sys/fs/cgroup/system.slice; do
	for c in $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null); do
		echo "+$c" > $dir/cgroup.subtree_control 2>/dev/null
	done
done
[ -e /etc/slurm/cgroup.conf ] || printf 'CgroupPlugin=cgroup/v2\nIgnoreSystemd=yes\n' \
	> /etc/slurm/cgroup.conf
if ! /usr/sbin/slurmd $opts -L /var/log/slurm/slurmd.log; then
	tail -n 5 /var/log/slurm/slurmd.log 2>/dev/null
	fail "slurmd did not start (/var/log/slurm/slurmd.log)"
fi
echo "dynprov: slurm: munged and slurmd started"
"""

SYSTEMD_DROPIN = """\
# fg-image-generate -slurm: /etc/slurm/slurm.conf may be absent (configless: slurmd fetches it
# from slurmctld, --conf-server in /etc/default/slurmd written at boot); munge first.
[Unit]
ConditionPathExists=
After=munge.service
Wants=munge.service
"""


def controller(value: str) -> str:
    """-slurm-server HOST[:PORT] (empty: the provisioning server's host, read at boot)."""
    if not value:
        return ""
    match = _CTLD.match(value)
    if not match:
        raise InputError(f"invalid -slurm-server {value!r} (expected HOST or HOST:PORT)")
    if not all(_DNS_LABEL.match(part) for part in match["host"].split(".")):
        raise InputError(f"invalid -slurm-server host {match['host']!r}")
    if match["port"]:
        validate.port(int(match["port"]), "-slurm-server port")
    return value


def conf_files(conf: Path | None) -> dict[str, bytes]:
    """slurm.conf (and helpers.conf beside it) for the image; checked before the build."""
    if conf is None:
        return {}
    conf = Path(conf)
    if not conf.is_file():
        raise InputError(f"-slurm-conf {conf}: no such file")
    out: dict[str, bytes] = {}
    for name, path in (("slurm.conf", conf), ("helpers.conf", conf.parent / "helpers.conf")):
        if name == "helpers.conf" and not path.is_file():
            continue
        data = path.read_bytes()
        if len(data) > CONF_MAX or b"\0" in data:
            raise InputError(f"{path}: not a Slurm configuration file")
        out[name] = data
    if b"slurmctldhost" not in out["slurm.conf"].lower() and \
            b"controlmachine" not in out["slurm.conf"].lower():
        raise InputError(f"-slurm-conf {conf}: no SlurmctldHost= line (which controller?)")
    return out


def remove_munge_key(tree: Path) -> bool:
    """Delete the key munge's postinst made at build time (every copy of the image would share
    it, and anyone who can fetch the image could forge credentials)."""
    key = resolve_in_tree(tree, PurePosixPath(MUNGE_KEY), follow_last=False)
    if key.is_symlink() or key.is_file():
        key.unlink()
        return True
    if key.exists():
        raise DynprovError(f"image tree: /{MUNGE_KEY} is not a file")
    return False


def add(tree: Path, *, ctld: str = "", conf: dict[str, bytes] | None = None) -> list[str]:
    """Write the Slurm node side into ``tree``; returns the image paths written."""
    source = assets.slurm()
    files: list[tuple[str, bytes, int]] = [
        (f"{TOOLS}/dynprov-slurm-node", (source / "dynprov-slurm-node").read_bytes(), 0o755),
        (f"{TOOLS}/dynprov-slurm-helper", (source / "dynprov-slurm-helper").read_bytes(), 0o755),
        (f"{TOOLS}/dynprov-slurm-reboot", REBOOT.encode(), 0o755),
        (f"{TOOLS}/start", START.encode(), 0o755),
        ("etc/dynprov/slurm", (f"ctld={ctld}\n" if ctld else "").encode(), 0o644),
        ("etc/systemd/system/slurmd.service.d/dynprov.conf", SYSTEMD_DROPIN.encode(), 0o644),
    ]
    files += [(f"etc/slurm/{name}", data, 0o644) for name, data in (conf or {}).items()]
    for rel, data, mode in files:
        pack.put_file(tree, rel, data, mode)
    remove_munge_key(tree)
    return [f"/{rel}" for rel, _, _ in files]
