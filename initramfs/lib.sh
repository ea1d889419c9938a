# dynprov shell library (busybox sh), sourced by the provisioning /init, the node agent and the
# test images' rcS. Installed as /lib/dynprov/lib.sh. Functions only: sourcing it does nothing.
#
# Host-testable on purpose (tests/test_initramfs.py runs it with busybox sh): paths come from
# variables, nothing here mounts or loads modules except dp_load_modules / dp_network_up.
#
# Kernel command line (docs/ARCHITECTURE.md, render.Renderer.kernel_args):
#   dynprov.server=http://SERVER:PORT dynprov.node=NAME dynprov.image=LABEL
#   dynprov.mode=stateless|stateful [dynprov.rootfs=blobs/SHA dynprov.sha256=SHA]
#   dynprov.token=TOKEN [dynprov.disk=/dev/XXX] [BOOTIF=01-aa-bb-cc-dd-ee-ff] [init=/sbin/init]
# Call-home: POST $server/report, form node/token/kind/detail[/facts]; 200 ok, 400/403/404 =
# refused. facts (optional): $DP_FACTS, the output of dp_facts (pxe/hwfacts.py parses it).

DYNPROV_CMDLINE_FILE=${DYNPROV_CMDLINE_FILE:-/proc/cmdline}
DYNPROV_REPORT_TRIES=${DYNPROV_REPORT_TRIES:-5}     # attempts per report
DYNPROV_REPORT_TIMEOUT=${DYNPROV_REPORT_TIMEOUT:-10} # seconds per attempt (busybox wget -T segfaults)
DYNPROV_REPORT_PAUSE=${DYNPROV_REPORT_PAUSE:-3}      # seconds between attempts
DYNPROV_FETCH_TRIES=${DYNPROV_FETCH_TRIES:-3}
DYNPROV_FETCH_TIMEOUT=${DYNPROV_FETCH_TIMEOUT:-1800}
DYNPROV_CARRIER_WAIT=${DYNPROV_CARRIER_WAIT:-15}     # seconds to wait for a link (e1000 takes ~2.5)

dp_log() {
	echo "dynprov: $*" >&2
}

# Read the dynprov.* parameters into DP_* variables (unknown words are ignored).
dp_parse_cmdline() {
	local arg
	DP_SERVER= DP_NODE= DP_IMAGE= DP_MODE= DP_ROOTFS= DP_SHA256= DP_TOKEN= DP_DISK=
	DP_BOOTIF= DP_INIT=
	[ -r "$DYNPROV_CMDLINE_FILE" ] || return 0
	set -f
	for arg in $(cat "$DYNPROV_CMDLINE_FILE"); do
		case $arg in
		dynprov.server=*) DP_SERVER=${arg#*=} ;;
		dynprov.node=*) DP_NODE=${arg#*=} ;;
		dynprov.image=*) DP_IMAGE=${arg#*=} ;;
		dynprov.mode=*) DP_MODE=${arg#*=} ;;
		dynprov.rootfs=*) DP_ROOTFS=${arg#*=} ;;
		dynprov.sha256=*) DP_SHA256=${arg#*=} ;;
		dynprov.token=*) DP_TOKEN=${arg#*=} ;;
		dynprov.disk=*) DP_DISK=${arg#*=} ;;
		BOOTIF=*) DP_BOOTIF=${arg#*=} ;;
		init=*) DP_INIT=${arg#*=} ;;
		esac
	done
	set +f
	DP_SERVER=${DP_SERVER%/}
	DP_SHA256=$(echo "$DP_SHA256" | tr 'A-F' 'a-f')
}

# dp_valid WHAT VALUE: 0 if VALUE is well formed, else 1 with DP_ERROR set.
dp_valid() {
	local what=$1 value=$2
	DP_ERROR=
	case $what in
	server)
		case $value in
		http://?*) case ${value#http://} in *[!]A-Za-z0-9.:/_[-]*) ;; *) return 0 ;; esac ;;
		esac
		DP_ERROR="bad dynprov.server '$value' (expected http://HOST:PORT)" ;;
	node | image)
		case $value in
		"" | [!A-Za-z0-9]* | *[!A-Za-z0-9._-]*) ;;
		*) return 0 ;;
		esac
		DP_ERROR="bad dynprov.$what '$value'" ;;
	mode)
		case $value in stateless | stateful | discover) return 0 ;; esac
		DP_ERROR="bad dynprov.mode '$value' (expected stateless, stateful or discover)" ;;
	token)
		case $value in "" | *[!A-Za-z0-9._~-]*) ;; *) return 0 ;; esac
		DP_ERROR="missing or malformed dynprov.token" ;;
	rootfs)
		case $value in
		"" | /* | *..* | *[!A-Za-z0-9._/-]*) ;;
		*) return 0 ;;
		esac
		DP_ERROR="bad dynprov.rootfs '$value' (a path relative to dynprov.server)" ;;
	sha256)
		if [ "${#value}" -eq 64 ]; then
			case $value in *[!0-9a-f]*) ;; *) return 0 ;; esac
		fi
		DP_ERROR="bad dynprov.sha256 '$value' (64 hex digits)" ;;
	*)
		DP_ERROR="dp_valid: unknown field $what" ;;
	esac
	return 1
}

# Can this boot call home? (server, node and token well formed)
dp_can_report() {
	dp_valid server "$DP_SERVER" && dp_valid node "$DP_NODE" && dp_valid token "$DP_TOKEN"
}

# Percent-encode $1 for application/x-www-form-urlencoded (everything but A-Za-z0-9-._~).
dp_urlencode() {
	printf %s "$1" | od -An -v -tx1 | awk '
		BEGIN { hex = "0123456789abcdef" }
		{
			for (i = 1; i <= NF; i++) {
				h = $i
				n = (index(hex, substr(h, 1, 1)) - 1) * 16 + index(hex, substr(h, 2, 1)) - 1
				if ((n >= 48 && n <= 57) || (n >= 65 && n <= 90) || (n >= 97 && n <= 122) ||
				    n == 45 || n == 46 || n == 95 || n == 126)
					printf "%c", n
				else
					printf "%%%s", toupper(h)
			}
		}'
}

# dp_report KIND [DETAIL]: POST one call-home report. Returns 0 when the server answered 200,
# 1 when it refused (400/403/404: retrying cannot help), 2 when unreachable after the retries.
dp_report() {
	local kind=$1 detail=${2:-} data err try=1
	if ! dp_can_report; then
		dp_log "cannot report $kind: $DP_ERROR"
		return 1
	fi
	data="node=$(dp_urlencode "$DP_NODE")&token=$(dp_urlencode "$DP_TOKEN")&kind=$kind"
	data="$data&detail=$(dp_urlencode "$detail")"
	[ -n "${DP_FACTS:-}" ] && data="$data&facts=$(dp_urlencode "$DP_FACTS")"
	while [ "$try" -le "$DYNPROV_REPORT_TRIES" ]; do
		if err=$(timeout "$DYNPROV_REPORT_TIMEOUT" wget -q -O /dev/null --post-data "$data" \
			"$DP_SERVER/report" 2>&1); then
			dp_log "reported $kind${detail:+: $detail}"
			return 0
		fi
		case $err in
		*" 400"* | *" 403"* | *" 404"*)
			dp_log "report $kind refused by $DP_SERVER: ${err#wget: }"
			return 1 ;;
		esac
		dp_log "report $kind: attempt $try/$DYNPROV_REPORT_TRIES failed: ${err:-timed out}"
		try=$((try + 1))
		[ "$try" -le "$DYNPROV_REPORT_TRIES" ] && sleep "$DYNPROV_REPORT_PAUSE"
	done
	return 2
}

# dp_facts: this machine's hardware, one `key value` line per fact (pxe/hwfacts.py reads them):
# cpus, cpu_model, memory_kib, disk NAME BYTES, nic NAME MAC, firmware bios|uefi,
# serial/vendor/product (DMI),
# bmc_address (only if ipmitool is there). Reads $DYNPROV_PROC and $DYNPROV_SYS (tests point
# them at fake trees); prints what it can read and never fails.
dp_facts() {
	local proc=${DYNPROV_PROC:-/proc} sys=${DYNPROV_SYS:-/sys} dev name value key
	value=$(grep -c '^processor' "$proc/cpuinfo" 2>/dev/null)
	echo "cpus ${value:-0}"
	value=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' "$proc/cpuinfo" 2>/dev/null |
		head -n 1)
	[ -n "$value" ] && echo "cpu_model $value"
	value=$(awk '/^MemTotal:/ { print $2; exit }' "$proc/meminfo" 2>/dev/null)
	[ -n "$value" ] && echo "memory_kib $value"
	for dev in "$sys"/block/*; do
		name=${dev##*/}
		case $name in loop* | ram* | zram* | sr* | fd* | dm-* | md* | nbd* | "*") continue ;; esac
		value=$(cat "$dev/size" 2>/dev/null)
		case $value in "" | *[!0-9]*) continue ;; esac
		echo "disk $name $((value * 512))"
	done
	for dev in "$sys"/class/net/*; do
		name=${dev##*/}
		[ "$name" = lo ] && continue
		value=$(cat "$dev/address" 2>/dev/null) || continue
		[ -n "$value" ] && echo "nic $name $value"
	done
	if [ -d "$sys/firmware/efi" ]; then echo "firmware uefi"; else echo "firmware bios"; fi
	for key in serial:product_serial vendor:sys_vendor product:product_name; do
		value=$(head -c 200 "$sys/class/dmi/id/${key#*:}" 2>/dev/null | head -n 1)
		[ -n "$value" ] && echo "${key%%:*} $value"
	done
	if command -v ipmitool >/dev/null 2>&1; then
		value=$(timeout 10 ipmitool lan print 2>/dev/null |
			awk -F': *' '/^IP Address[[:space:]]*:/ { print $2; exit }')
		[ -n "$value" ] && echo "bmc_address $value"
	fi
	return 0
}

# dp_discover_report MAC: a machine the inventory does not know (dynprov.mode=discover) sends
# its MAC and dp_facts to $DP_SERVER/discover (pxe/serve/discover.py). 0 stored, 1 refused or
# not stored (403 off, 409 known, 429 too soon, 507 full: all final), 2 unreachable.
dp_discover_report() {
	local mac=$1 data err
	dp_valid server "$DP_SERVER" || { dp_log "cannot report discovery: $DP_ERROR"; return 1; }
	data="mac=$(dp_urlencode "$mac")&facts=$(dp_urlencode "$(dp_facts)")"
	if err=$(timeout "$DYNPROV_REPORT_TIMEOUT" wget -q -O /dev/null --post-data "$data" \
		"$DP_SERVER/discover" 2>&1); then
		dp_log "discovery: reported $mac to $DP_SERVER"
		return 0
	fi
	case $err in
	*" 4"[0-9][0-9]* | *" 5"[0-9][0-9]*) dp_log "discovery: $DP_SERVER answered ${err#wget: }"; return 1 ;;
	esac
	dp_log "discovery: $DP_SERVER unreachable: ${err:-timed out}"
	return 2
}

# dp_fetch URL DEST: download with bounded retries; 0 ok, 1 failed (DP_ERROR set).
dp_fetch() {
	local url=$1 dest=$2 err try=1
	while [ "$try" -le "$DYNPROV_FETCH_TRIES" ]; do
		rm -f "$dest"
		if err=$(timeout "$DYNPROV_FETCH_TIMEOUT" wget -q -O "$dest" "$url" 2>&1); then
			return 0
		fi
		case $err in
		*" 40"[0-9]*) break ;;
		esac
		dp_log "fetch $url: attempt $try/$DYNPROV_FETCH_TRIES failed: ${err:-timed out}"
		try=$((try + 1))
		[ "$try" -le "$DYNPROV_FETCH_TRIES" ] && sleep "$DYNPROV_REPORT_PAUSE"
	done
	rm -f "$dest"
	err=${err#wget: }
	DP_ERROR="cannot fetch $url: ${err:-timed out}"
	return 1
}

# dp_verify FILE SHA256: 0 if the file's sha256 is SHA256, else 1 with DP_ERROR set.
dp_verify() {
	local got
	got=$(sha256sum "$1" | cut -d' ' -f1)
	[ "$got" = "$2" ] && return 0
	DP_ERROR="sha256 mismatch: got $got, expected $2"
	return 1
}

# dp_kind FILE: print what the file is: squashfs gzip xz zstd bzip2 tar disk unknown.
dp_kind() {
	local magic
	magic=$(od -An -v -tx1 -N 6 "$1" 2>/dev/null | tr -d ' \n')
	case $magic in
	68737173*) echo squashfs ;;
	1f8b*) echo gzip ;;
	fd377a585a00) echo xz ;;
	28b52ffd*) echo zstd ;;
	425a68*) echo bzip2 ;;
	*)
		if [ "$(od -An -c -j 257 -N 5 "$1" 2>/dev/null | tr -d ' \n')" = ustar ]; then
			echo tar
		elif [ "$(od -An -v -tx1 -j 510 -N 2 "$1" 2>/dev/null | tr -d ' \n')" = 55aa ]; then
			echo disk
		else
			echo unknown
		fi ;;
	esac
}

# dp_cat FILE KIND: write the (decompressed) content of FILE to stdout.
dp_cat() {
	case $2 in
	gzip) gunzip -c "$1" ;;
	xz) unxz -c "$1" ;;
	bzip2) bunzip2 -c "$1" ;;
	zstd) DP_ERROR="zstd is not supported by busybox 1.35 (use gzip or xz)"; return 1 ;;
	*) cat "$1" ;;
	esac
}

# dp_unpack_tar FILE DIR: unpack a (gzip/xz/bzip2-compressed) tarball into DIR.
dp_unpack_tar() {
	local kind err
	kind=$(dp_kind "$1")
	case $kind in
	tar | gzip | xz | bzip2) ;;
	*) DP_ERROR="root filesystem is $kind, not a tarball or squashfs"; return 1 ;;
	esac
	if ! err=$( (set -o pipefail; dp_cat "$1" "$kind" | tar -x -f - -C "$2") 2>&1); then
		DP_ERROR="cannot unpack the root filesystem: $err"
		return 1
	fi
}

# dp_write_disk FILE DEV: write a raw disk image (optionally gzip/xz/bzip2 compressed) to DEV.
dp_write_disk() {
	local kind inner err
	kind=$(dp_kind "$1")
	case $kind in
	disk) ;;
	gzip | xz | bzip2)
		inner=$( (dp_cat "$1" "$kind" | dd bs=512 count=1 2>/dev/null | od -An -v -tx1 -j 510 -N 2 |
			tr -d ' \n') 2>/dev/null)
		if [ "$inner" != 55aa ]; then
			DP_ERROR="stateful root filesystem is not a disk image (no MBR signature)"
			return 1
		fi ;;
	*)
		DP_ERROR="stateful root filesystem is $kind, not a raw disk image"
		return 1 ;;
	esac
	if ! err=$( (set -o pipefail; dp_cat "$1" "$kind" | dd of="$2" bs=1M conv=fsync) 2>&1); then
		DP_ERROR="cannot write $2: $(echo "$err" | tail -n 1)"
		return 1
	fi
}

# dp_patch_bootcfg FILE: put this boot's dynprov.* parameters (not rootfs/sha256: the disk is
# installed) on every APPEND line of a syslinux/extlinux config, replacing any old ones, so the
# installed system's agent can report "ready" with the same one-time token.
dp_patch_bootcfg() {
	local args
	dp_can_report && dp_valid image "$DP_IMAGE" || return 1 # no '|' or '&' can reach sed
	args="dynprov.server=$DP_SERVER dynprov.node=$DP_NODE dynprov.image=$DP_IMAGE"
	args="$args dynprov.mode=stateful dynprov.token=$DP_TOKEN"
	grep -qi '^[[:space:]]*append' "$1" || { DP_ERROR="no APPEND line in $1"; return 1; }
	sed -i -e '/^[[:space:]]*[Aa][Pp][Pp][Ee][Nn][Dd]/{
		s/[[:space:]]dynprov\.[a-z0-9]*=[^[:space:]]*//g
		s|[[:space:]]*$| '"$args"'|
	}' "$1"
}

# dp_os_label [OS_RELEASE]: the image label an os-release names (IMAGE_ID, else ID).
dp_os_label() {
	local file=${1:-/etc/os-release} value key
	[ -r "$file" ] || file=/usr/lib/os-release
	for key in IMAGE_ID ID; do
		value=$(sed -n "s/^$key=//p" "$file" 2>/dev/null | head -n 1 | tr -d '"'"'")
		[ -n "$value" ] && { echo "$value"; return 0; }
	done
	return 1
}

# --- hardware (the node only) -------------------------------------------------------------

# dp_load_modules LIST: insmod each module named in LIST (paths relative to
# /lib/modules/$(uname -r), dependencies first, as the builder wrote them).
dp_load_modules() {
	local list=$1 dir path err
	dir=/lib/modules/$(uname -r)
	[ -r "$list" ] || return 0
	if [ ! -d "$dir" ]; then
		dp_log "no modules for kernel $(uname -r) (built for: $(ls /lib/modules 2>/dev/null))"
		return 1
	fi
	while read -r path; do
		[ -n "$path" ] || continue
		if ! err=$(insmod "$dir/$path" 2>&1); then
			case $err in
			*"File exists"* | *"already"*) ;;
			*"No such device"*) dp_log "insmod $path: no such device here (skipped)" ;;
			*) dp_log "insmod $path: $err" ;;
			esac
		fi
	done <"$list"
	return 0
}

# dp_interfaces: the network interfaces to try, BOOTIF's first.
dp_interfaces() {
	local want= n
	if [ -n "$DP_BOOTIF" ]; then
		want=$(echo "${DP_BOOTIF#??-}" | tr 'A-F-' 'a-f:')
	fi
	for n in /sys/class/net/*; do
		n=${n##*/}
		[ "$n" = lo ] || [ ! -e "/sys/class/net/$n/address" ] && continue
		if [ -n "$want" ] && [ "$(cat "/sys/class/net/$n/address")" = "$want" ]; then
			echo "$n"
		fi
	done
	for n in /sys/class/net/*; do
		n=${n##*/}
		[ "$n" = lo ] || [ ! -e "/sys/class/net/$n/address" ] && continue
		[ -n "$want" ] && [ "$(cat "/sys/class/net/$n/address")" = "$want" ] && continue
		echo "$n"
	done
}

# dp_network_up SCRIPT: bring the NICs up, wait for carrier, DHCP on the first one that gets a
# lease (udhcpc configures nothing without -s SCRIPT). Sets DP_IFACE; 1 with DP_ERROR on failure.
dp_network_up() {
	local script=$1 ifaces n i carrier=
	ifaces=$(dp_interfaces)
	[ -n "$ifaces" ] || { DP_ERROR="no network interface (NIC driver not loaded?)"; return 1; }
	for n in $ifaces; do ip link set "$n" up 2>/dev/null; done
	i=0
	while [ "$i" -lt "$((DYNPROV_CARRIER_WAIT * 10))" ]; do
		for n in $ifaces; do
			if [ "$(cat "/sys/class/net/$n/carrier" 2>/dev/null)" = 1 ]; then
				case " $carrier " in *" $n "*) ;; *) carrier="$carrier $n" ;; esac
			fi
		done
		[ -n "$carrier" ] && break
		usleep 100000
		i=$((i + 1))
	done
	[ -n "$carrier" ] || { DP_ERROR="no carrier on $(echo $ifaces) after ${DYNPROV_CARRIER_WAIT}s"; return 1; }
	usleep 500000 # links that come up together: try every NIC with carrier, BOOTIF's first
	carrier=
	for n in $ifaces; do
		[ "$(cat "/sys/class/net/$n/carrier" 2>/dev/null)" = 1 ] && carrier="$carrier $n"
	done
	for n in $carrier; do
		dp_log "DHCP on $n"
		if udhcpc -i "$n" -s "$script" -f -q -n -t 5 -T 3 >/dev/null 2>&1; then
			DP_IFACE=$n
			return 0
		fi
	done
	DP_ERROR="no DHCP lease on$carrier"
	return 1
}

# dp_ipv4 IFACE: the interface's IPv4 address (empty if none).
dp_ipv4() {
	ip -4 -o addr show dev "$1" 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }'
}
