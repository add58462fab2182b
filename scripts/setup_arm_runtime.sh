#!/usr/bin/env bash
# Installs what emulated aarch64 runs of TVM artifacts need on an x86 host: Debian's arm64
# python3.11 (unpacked with dpkg -x, no chroot and no change to the host's apt configuration)
# and PyPI's aarch64 wheels of the TVM runtime. qemu-user runs the result; onnxpress's ARM
# backend finds it in $ONNXPRESS_ARM_RUNTIME (default ~/.cache/onnxpress/arm-runtime).
#
# Idempotent: a stamp file records what was installed; a second run returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST="${ONNXPRESS_ARM_RUNTIME:-$HOME/.cache/onnxpress/arm-runtime}"
VENV="${VENV:-.venv}"
PY="${PYTHON_FOR_PIP:-$VENV/bin/python}"
[ -x "$PY" ] || PY=python3
WHEELS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy ml_dtypes psutil
        typing_extensions cloudpickle tornado)
STAMP_VALUE="v1 ${WHEELS[*]}"
STAMP="$DEST/.installed"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_VALUE" ] && [ -x "$DEST/sysroot/usr/bin/python3.11" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    echo "setup_arm_runtime: apt-get/dpkg missing; emulated ARM runs will be skipped" >&2
    exit 0
fi

echo "setup_arm_runtime: installing the aarch64 Python runtime into $DEST"
mkdir -p "$DEST"
TMP="$(mktemp -d "$DEST/.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# A private apt state for arm64 only: the host's dpkg architectures and lists stay untouched.
APT="$TMP/apt"
mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/etc/preferences.d" "$APT/etc/apt.conf.d"
: > "$APT/status"
SRC_ARGS=()
if [ -f /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list; then
    SRC_ARGS+=(-o "Dir::Etc::sourcelist=/etc/apt/sources.list")
else
    SRC_ARGS+=(-o "Dir::Etc::sourcelist=/dev/null")
fi
SRC_ARGS+=(-o "Dir::Etc::sourceparts=/etc/apt/sources.list.d")
APT_OPTS=(-o "APT::Architecture=arm64" -o "APT::Architectures::=arm64"
          -o "Dir::State::Lists=$APT/lists" -o "Dir::State::status=$APT/status"
          -o "Dir::Cache=$APT" -o "Dir::Cache::archives=$APT/archives"
          -o "Dir::Etc::preferencesparts=$APT/etc/preferences.d"
          -o "Dir::Etc::parts=$APT/etc/apt.conf.d" "${SRC_ARGS[@]}"
          -o "Acquire::Languages=none" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get -qq "${APT_OPTS[@]}" update >/dev/null

ROOTS=(python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1 libc6)
mapfile -t PKGS < <(apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends "${ROOTS[@]}" \
    | grep -v '^ ' | grep -v '^<' | sed 's/:arm64$//' | sort -u)
# debconf and friends are Perl tooling that a runtime never needs.
KEEP=()
for p in "${PKGS[@]}"; do
    case "$p" in debconf*|perl*|dpkg|install-info|tzdata|media-types|libdb5.3|readline-common) ;;
                 *) KEEP+=("$p:arm64") ;; esac
done
(cd "$APT/archives" && apt-get -qq "${APT_OPTS[@]}" download "${KEEP[@]}" >/dev/null)

SYSROOT="$TMP/sysroot"
mkdir -p "$SYSROOT"
for deb in "$APT"/archives/*.deb; do
    dpkg -x "$deb" "$SYSROOT"
done
# Debian's usrmerge links (/lib -> usr/lib) that dpkg -x does not create.
for d in lib bin sbin; do
    if [ -d "$SYSROOT/usr/$d" ] && [ ! -e "$SYSROOT/$d" ]; then ln -s "usr/$d" "$SYSROOT/$d"; fi
done
[ -e "$SYSROOT/lib/ld-linux-aarch64.so.1" ] || { echo "setup_arm_runtime: no aarch64 loader unpacked" >&2; exit 1; }

# PyPI's aarch64 wheels, unpacked into a plain directory for PYTHONPATH.
"$PY" -m pip install -q --disable-pip-version-check --no-warn-script-location --no-deps --only-binary=:all: \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    --python-version 3.11 --implementation cp --abi cp311 \
    --target "$TMP/site" "${WHEELS[@]}"

rm -rf "$DEST/sysroot" "$DEST/site"
mv "$SYSROOT" "$DEST/sysroot"
mv "$TMP/site" "$DEST/site"
echo "$STAMP_VALUE" > "$STAMP"
echo "setup_arm_runtime: done ($DEST)"
