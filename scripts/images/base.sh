#!/usr/bin/env bash
# A Debian bookworm base image made here, with no registry: debootstrap from the Debian mirror apt already uses, then
# `docker import`. For air-gapped sites (point MIRROR at the site's mirror) and for machines that reach Debian and
# PyPI but no container registry. It holds Python 3.11 with venv and pip, and Debian's CA certificates; apt is set up
# as in Debian's own images (no package cache kept, no translations) so later layers carry no apt cache.
#
#   scripts/images/base.sh [IMAGE]        (default splitllm-base:bookworm; root, debootstrap and an engine needed)
#   MIRROR=http://mirror.example/debian SUITE=bookworm DOCKER=/usr/bin/docker scripts/images/base.sh
set -euo pipefail
image=${1:-splitllm-base:bookworm}
suite=${SUITE:-bookworm}
docker=${DOCKER:-docker}

# The first mirror in apt's own sources that serves the suite (deb822 .sources or one-line .list files).
apt_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || return 0
    awk -v suite="$suite" '
        /^deb / && $3 == suite { print $2; exit }
        /^URIs:/ { uri = $2 } /^Suites:/ && uri != "" { for (i = 2; i <= NF; i++) if ($i == suite) { print uri; exit } }
    ' "${files[@]}"
}
mirror=${MIRROR:-$(apt_mirror)}
if [[ -z $mirror ]]; then
    echo "base.sh: no Debian mirror for $suite in /etc/apt/sources*; set MIRROR=http://your.mirror/debian" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "base.sh: debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

rootfs=$(mktemp -d -t splitllm-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "base.sh: debootstrap $suite from $mirror (a few minutes)" >&2
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"

# Debian's container apt config (as in the debian:bookworm images): no .deb or pkgcache kept after a run, no
# translations, indexes kept compressed, suggestions not kept installed.
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true"; Acquire::CompressionTypes::Order:: "gz";' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
# What debootstrap leaves behind: downloaded packages, package lists, logs, and docs/man pages (copyrights stay).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete

tar -C "$rootfs" --numeric-owner -c . | "$docker" import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $suite from $mirror (scripts/images/base.sh)" - "$image" >/dev/null
echo "base.sh: built $image ($("$docker" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
