# Sourced by scripts that need a real PostgreSQL server: a throwaway cluster (Debian's
# `postgresql`, installed if missing) in a temporary directory, run as the `postgres` user when
# the caller is root. After `pg_cluster_start [fast|durable]`:
#   pg_url       postgres://dermedge:<password>@127.0.0.1:<port>/dermedge (role and database made)
#   pg_ca        the server's self-signed certificate (PEM): the cluster also takes TLS, and a
#                URL with `sslrootcert=$pg_ca` connects over it
#   pg_work      the cluster's directory; pg_port, pg_password, pg_bindir
#   psql_admin   psql as the superuser over the cluster's socket
# `fast` turns fsync, synchronous commit and full-page writes off (tests); `durable` keeps the
# server's defaults (benchmarks). The caller's EXIT trap must call `pg_cluster_stop "$status"`.

_pg_log() { echo "postgres-cluster: $*" >&2; }

# PostgreSQL's server binaries (Debian keeps them out of PATH).
_pg_find_bin() {
  local dir
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
      echo "$dir"
      return
    fi
  done
  return 1
}

pg_cluster_start() {
  local mode="${1:-fast}" sudo_cmd=() tmp settings
  if ! pg_bindir="$(_pg_find_bin)"; then
    _pg_log "installing Debian's postgresql"
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq postgresql >/dev/null
    # Debian starts a default cluster; this one is the caller's own.
    "${sudo_cmd[@]}" service postgresql stop >/dev/null 2>&1 || true
    pg_bindir="$(_pg_find_bin)" || { _pg_log "error: no initdb after installing postgresql"; return 1; }
  fi
  _pg_log "PostgreSQL: $("$pg_bindir/postgres" --version)"
  if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || { _pg_log "error: no postgres user (install postgresql)"; return 1; }
    _pg_as=(runuser -u postgres --)
    # In /tmp: the postgres user must reach the cluster's directory (not a TMPDIR under /root).
    tmp=/tmp
  else
    _pg_as=()
    tmp="${TMPDIR:-/tmp}"
  fi
  pg_work="$(mktemp -d "$tmp/dermedge-pg.XXXXXX")"
  [[ $(id -u) -ne 0 ]] || chown postgres: "$pg_work"
  chmod 700 "$pg_work"
  pg_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  pg_password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
  # Local (socket) connections are trusted for setup; TCP ones need the password.
  "${_pg_as[@]}" "$pg_bindir/initdb" -D "$pg_work/data" -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C >/dev/null
  # TLS too, with a certificate made here for 127.0.0.1 (an end-entity one: rustls refuses a CA
  # certificate as a server's own).
  command -v openssl >/dev/null || {
    _pg_log "installing Debian's openssl"
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq openssl >/dev/null
  }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
    -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -keyout "$pg_work/data/server.key" -out "$pg_work/data/server.crt" 2>"$pg_work/openssl.log" \
    || { cat "$pg_work/openssl.log" >&2; _pg_log "error: openssl could not make the server's certificate"; return 1; }
  chmod 600 "$pg_work/data/server.key"
  [[ $(id -u) -ne 0 ]] || chown postgres: "$pg_work/data/server.key" "$pg_work/data/server.crt"
  pg_ca="$pg_work/ca.crt"
  cp "$pg_work/data/server.crt" "$pg_ca"
  settings="-p $pg_port -k $pg_work -c listen_addresses=127.0.0.1 -c max_connections=200 -c ssl=on"
  if [[ "$mode" == fast ]]; then
    settings+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  "${_pg_as[@]}" "$pg_bindir/pg_ctl" -D "$pg_work/data" -l "$pg_work/postgres.log" -w -t 60 \
    -o "$settings" start >/dev/null
  psql_admin -d postgres -c "CREATE ROLE dermedge LOGIN PASSWORD '$pg_password'" \
    -c "CREATE DATABASE dermedge OWNER dermedge"
  pg_url="postgres://dermedge:$pg_password@127.0.0.1:$pg_port/dermedge"
  _pg_log "cluster ($mode) on 127.0.0.1:$pg_port in $pg_work"
}

psql_admin() {
  "${_pg_as[@]}" "$pg_bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$pg_work" -p "$pg_port" -U postgres "$@"
}

# Stop and delete the cluster; on a failure ($1 non-zero), show the end of the server's log.
pg_cluster_stop() {
  local status="${1:-0}"
  [[ -n "${pg_work:-}" ]] || return 0
  if [[ -f "$pg_work/data/postmaster.pid" ]]; then
    "${_pg_as[@]}" "$pg_bindir/pg_ctl" -D "$pg_work/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  if ((status != 0)) && [[ -f "$pg_work/postgres.log" ]]; then
    _pg_log "the server's log:"
    tail -n 40 "$pg_work/postgres.log" >&2 || true
  fi
  rm -rf "$pg_work"
  pg_work=""
}
