#!/usr/bin/env bash
# Install an unpacked dermedge bundle into /opt/dermedge (or $1) and register its systemd unit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${1:-/opt/dermedge}"
mkdir -p "$prefix"
cp -a "$here/bin" "$here/lib" "$here/share" "$prefix/"
if [[ -d /etc/systemd/system && "$prefix" == /opt/dermedge ]]; then
  cp "$here/share/dermedge/dermedge.service" /etc/systemd/system/dermedge.service
  systemctl daemon-reload || true
  echo "installed; enable with: systemctl enable --now dermedge"
else
  echo "installed in $prefix"
fi
"$prefix/bin/dermedge" doctor
