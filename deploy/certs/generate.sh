#!/usr/bin/env bash
# Writes throwaway credentials for a MiniCache cluster into one directory:
#
#   ca.crt ca.key            a private CA (ca.key stays 0600 and is never mounted)
#   server.crt server.key    the cache servers' certificate (serverAuth + clientAuth, so
#                            the in-image health probe can also present it under mTLS)
#   client.crt client.key    a client certificate for mTLS (MINICACHE_TLS_CLIENT_CA)
#   redis.crt redis.key      Redis' TLS certificate
#   worker.crt worker.key    the inference workers' certificate (serverAuth)
#   tokens                   "<token> <tenant>" lines for the cache servers: tenant-a,
#                            tenant-b and `workers` (the token in worker-cache-token)
#   worker-tokens            "<token> <tenant>" lines for the workers' own callers:
#                            tenant-a and tenant-b (tokens of their own)
#   worker-cache-token       the one token the workers present to the cache servers
#   redis-password           the password of Redis user `minicache`
#   redis-users.acl          Redis ACL file: default user off, `minicache` by SHA-256
#
# For docker compose (default output dir, which is git-ignored):
#   bash deploy/certs/generate.sh
# For a Kubernetes overlay (its secretGenerator reads these files; also git-ignored):
#   bash deploy/certs/generate.sh --out deploy/kubernetes/overlays/dev/secrets --namespace minicache-dev
# For the local multi-node runner (deploy/local/cluster.py, which calls it this way):
#   MINICACHE_CERT_IPS=127.0.0.2,127.0.0.11 bash deploy/certs/generate.sh --out .cluster/certs
#
# MINICACHE_CERT_IPS: more IP addresses (comma- or space-separated) the server, Redis and
# worker certificates carry beside 127.0.0.1, for clients that dial a node by its IP; a
# kept certificate that lacks one of them is re-issued.
#
# Idempotent: existing files are kept (a new CA re-issues every certificate); --force
# regenerates everything. These are development credentials: use your own PKI and
# secret store in production.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$repo_root/deploy/certs/out"
namespace="minicache"
replicas=3
days=365
force=0

usage() {
  cat <<EOF
usage: $0 [--out DIR] [--namespace NS] [--replicas N] [--days N] [--force]
  --out DIR        output directory (default deploy/certs/out); inside the repository only
                   deploy/certs/out, deploy/kubernetes/overlays/<name>/secrets or
                   .cluster/<name> (the local runner's state directory)
  --namespace NS   Kubernetes namespace for the certificates' DNS names (default minicache)
  --replicas N     cache-server pods named in the certificate (default 3; a wildcard
                   for the headless service covers more)
  --days N         certificate validity (default 365)
  --force          regenerate every file, even those that exist
env MINICACHE_CERT_IPS  more IP SANs of the server, Redis and worker certificates
                   (comma- or space-separated), e.g. the local runner's 127.0.0.x addresses
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --namespace) namespace="${2:?--namespace needs a name}"; shift 2 ;;
    --replicas) replicas="${2:?--replicas needs a number}"; shift 2 ;;
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "generate.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$replicas" in ''|*[!0-9]*) echo "generate.sh: --replicas must be a number" >&2; exit 2 ;; esac
case "$days" in ''|*[!0-9]*) echo "generate.sh: --days must be a number" >&2; exit 2 ;; esac
command -v openssl >/dev/null || { echo "generate.sh: openssl is required" >&2; exit 1; }
extra_ips=()
IFS=', ' read -ra requested_ips <<<"${MINICACHE_CERT_IPS:-}"
for ip in "${requested_ips[@]}"; do
  if ! [[ "$ip" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ || "$ip" =~ ^[0-9A-Fa-f]*:[0-9A-Fa-f:]*$ ]]; then
    echo "generate.sh: MINICACHE_CERT_IPS: not an IP address: $ip" >&2
    exit 2
  fi
  extra_ips+=("$ip")
done

case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
out="$(realpath -m "$out" 2>/dev/null || printf '%s' "$out")"
# Inside the repository only the git-ignored locations: secrets must never be committed.
case "$out/" in
  "$repo_root/deploy/certs/out/" | "$repo_root"/deploy/kubernetes/overlays/*/secrets/) ;;
  "$repo_root"/.cluster/?*/) ;;
  "$repo_root"/*)
    echo "generate.sh: refusing to write secrets to $out: inside the repository use" \
      "deploy/certs/out, deploy/kubernetes/overlays/<name>/secrets or .cluster/<name>" \
      "(git-ignored)" >&2
    exit 1 ;;
esac
mkdir -p "$out"
# The directory protects the files on the host; the files themselves are readable so that
# the containers' non-root users (10001, Redis 999) can read them through bind mounts.
chmod 0700 "$out"

log() { printf '[certs] %s\n' "$*"; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

need() {  # need FILE...: true when any of the files must be (re)written
  [ "$force" -eq 1 ] && return 0
  local f
  for f in "$@"; do [ -s "$out/$f" ] || return 0; done
  return 1
}

new_key() {  # new_key PATH: an EC P-256 key (accepted by gRPC, Redis and redis-py)
  openssl ecparam -name prime256v1 -genkey -noout -out "$1"
}

serial() { echo "0x$(openssl rand -hex 16)"; }

sign() {  # sign NAME CN EXTENSIONS: NAME.key + NAME.crt signed by the CA
  local name="$1" cn="$2" extensions="$3"
  new_key "$tmp/$name.key"
  openssl req -new -key "$tmp/$name.key" -subj "/O=MiniCache/CN=$cn" -out "$tmp/$name.csr" \
    -config "$tmp/req.cnf"
  printf '%s\n' "$extensions" >"$tmp/$name.ext"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -set_serial "$(serial)" -days "$days" -sha256 -extfile "$tmp/$name.ext" \
    -out "$tmp/$name.crt" 2>/dev/null
  install -m 0644 "$tmp/$name.key" "$out/$name.key"
  install -m 0644 "$tmp/$name.crt" "$out/$name.crt"
  log "wrote $name.crt, $name.key ($cn)"
}

dns_list() {  # dns_list NAME...: "DNS:a,DNS:b"
  local first=1 name
  for name in "$@"; do
    [ $first -eq 1 ] || printf ','
    printf 'DNS:%s' "$name"
    first=0
  done
}

cat >"$tmp/req.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF

# The CA. A new CA invalidates every certificate it did not sign: re-issue them all.
reissue=$force
if need ca.crt ca.key; then
  new_key "$tmp/ca.key"
  openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$days" \
    -subj "/O=MiniCache/CN=MiniCache throwaway CA" -config "$tmp/req.cnf" \
    -extensions v3_ca -set_serial "$(serial)" -out "$tmp/ca.crt"
  install -m 0600 "$tmp/ca.key" "$out/ca.key"
  install -m 0644 "$tmp/ca.crt" "$out/ca.crt"
  log "wrote ca.crt, ca.key"
  reissue=1
fi

# Cache servers: compose names, the Kubernetes service (headless: one name per pod), its
# pods by name and by wildcard, and loopback for the in-container probe.
service="minicache-cache-server"
server_names=(localhost cache-server-0 cache-server-1 cache-server-2 "$service")
for suffix in "" ".$namespace" ".$namespace.svc" ".$namespace.svc.cluster.local"; do
  [ -n "$suffix" ] && server_names+=("$service$suffix")
  server_names+=("*.$service$suffix")
  for ((i = 0; i < replicas; i++)); do
    server_names+=("$service-$i.$service$suffix")
  done
done
redis_names=(localhost redis minicache-redis)
for suffix in ".$namespace" ".$namespace.svc" ".$namespace.svc.cluster.local"; do
  redis_names+=("minicache-redis$suffix")
done
# Inference workers: compose names, the Kubernetes Service (load-balanced, one name),
# and loopback for the in-container probe and host clients.
worker_service="minicache-worker"
worker_names=(localhost worker-a worker-b "$worker_service")
for suffix in ".$namespace" ".$namespace.svc" ".$namespace.svc.cluster.local"; do
  worker_names+=("$worker_service$suffix")
done

ip_list() {  # ip_list: "IP:127.0.0.1,IP:<each MINICACHE_CERT_IPS address>"
  printf 'IP:127.0.0.1'
  local ip
  for ip in "${extra_ips[@]}"; do printf ',IP:%s' "$ip"; done
}

lacks_ips() {  # lacks_ips NAME: true when NAME.crt misses an address of MINICACHE_CERT_IPS
  local sans ip
  [ "${#extra_ips[@]}" -eq 0 ] && return 1
  sans="$(openssl x509 -in "$out/$1.crt" -noout -ext subjectAltName 2>/dev/null |
    tr ',' '\n' | sed 's/^ *//')" || return 0
  for ip in "${extra_ips[@]}"; do
    grep -qxF "IP Address:$ip" <<<"$sans" || return 0
  done
  return 1
}

leaf_ext() {  # leaf_ext EKU SAN
  printf 'basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = %s\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n%s' "$1" "${2:+subjectAltName = $2}"
}

if [ "$reissue" -eq 1 ] || need server.crt server.key || lacks_ips server; then
  sign server "$service" "$(leaf_ext "serverAuth, clientAuth" "$(dns_list "${server_names[@]}"),$(ip_list)")"
else
  log "kept server.crt (--force regenerates it, e.g. after changing --namespace or --replicas)"
fi
if [ "$reissue" -eq 1 ] || need client.crt client.key; then
  sign client "minicache-client" "$(leaf_ext "clientAuth" "")"
else
  log "kept client.crt"
fi
if [ "$reissue" -eq 1 ] || need redis.crt redis.key || lacks_ips redis; then
  sign redis "minicache-redis" "$(leaf_ext "serverAuth" "$(dns_list "${redis_names[@]}"),$(ip_list)")"
else
  log "kept redis.crt"
fi
if [ "$reissue" -eq 1 ] || need worker.crt worker.key || lacks_ips worker; then
  sign worker "$worker_service" "$(leaf_ext "serverAuth" "$(dns_list "${worker_names[@]}"),$(ip_list)")"
else
  log "kept worker.crt (--force regenerates it, e.g. after changing --namespace)"
fi

# Bearer tokens of two tenants (the server requires >= 16 characters; these have 32).
if need tokens; then
  {
    echo "# <token> <tenant>: MINICACHE_TOKENS_FILE. Throwaway development tokens."
    echo "$(openssl rand -hex 16) tenant-a"
    echo "$(openssl rand -hex 16) tenant-b"
  } >"$tmp/tokens"
  install -m 0644 "$tmp/tokens" "$out/tokens"
  log "wrote tokens (tenant-a, tenant-b)"
else
  log "kept tokens"
fi

# The workers' token for the cache servers, and the tokens of the workers' own callers
# (separate from the cache servers': a cache client's token buys no inference, and the
# other way round).
if need worker-cache-token; then
  openssl rand -hex 16 >"$tmp/worker-cache-token"
  install -m 0644 "$tmp/worker-cache-token" "$out/worker-cache-token"
  log "wrote worker-cache-token"
else
  log "kept worker-cache-token"
fi
# The cache servers admit it as tenant `workers`: written into `tokens` when missing (also
# into a `tokens` file from before the workers, whose other lines stay as they are), in
# place of any older `workers` line.
worker_cache_token="$(tr -d '[:space:]' <"$out/worker-cache-token")"
if ! grep -q "^$worker_cache_token workers\$" "$out/tokens"; then
  grep -v ' workers$' "$out/tokens" >"$tmp/tokens" || true
  echo "$worker_cache_token workers" >>"$tmp/tokens"
  install -m 0644 "$tmp/tokens" "$out/tokens"
  log "added the workers' token (tenant workers) to tokens"
fi
if need worker-tokens; then
  {
    echo "# <token> <tenant>: MINICACHE_WORKER_TOKENS_FILE. Throwaway development tokens."
    echo "$(openssl rand -hex 16) tenant-a"
    echo "$(openssl rand -hex 16) tenant-b"
  } >"$tmp/worker-tokens"
  install -m 0644 "$tmp/worker-tokens" "$out/worker-tokens"
  log "wrote worker-tokens (tenant-a, tenant-b)"
else
  log "kept worker-tokens"
fi

if need redis-password; then
  openssl rand -hex 24 >"$tmp/redis-password"
  install -m 0644 "$tmp/redis-password" "$out/redis-password"
  log "wrote redis-password"
else
  log "kept redis-password"
fi
# Derived from the password every time (same content when the password is unchanged).
# Redis stores only the SHA-256; the server's user may not run admin commands.
password_sha256="$(tr -d '\n' <"$out/redis-password" | openssl dgst -sha256 | sed 's/.*= *//')"
cat >"$tmp/redis-users.acl" <<EOF
user default off
user minicache on #$password_sha256 ~minicache* &* +@all -@admin
EOF
install -m 0644 "$tmp/redis-users.acl" "$out/redis-users.acl"

openssl verify -CAfile "$out/ca.crt" "$out/server.crt" "$out/client.crt" "$out/redis.crt" \
  "$out/worker.crt" >/dev/null
log "all certificates verify against ca.crt; files are in $out (keep them out of git)"
