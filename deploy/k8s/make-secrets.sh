#!/usr/bin/env sh
# Create the files the gpu-prod overlay turns into the fovea-secrets Secret:
#   admin-token, worker-token, gateway-token, worker-call-token
#                   one token per kind of caller (random, 32 bytes, hex): an operator's (no pod
#                   holds it), the workers' and the gateways' at the registry, and what gateways
#                   present to workers
#   registry-admin-tokens, registry-worker-tokens, registry-gateway-tokens
#                   what the registry accepts: comma-separated lists of sha256:<hex> digests (the
#                   registry holds no token itself); list old and new while rotating
#   worker-accepted-tokens  what workers accept from gateways: a comma-separated list, plain
#   encryption-key  AES-256 key for artifacts at rest (32 random bytes, base64)
#   previous-encryption-key  the key being rotated out, set only while rotating (empty)
#   redis-password  password of the in-cluster Redis (unused with an external one)
#   redis-url       where Redis is (default: the in-cluster StatefulSet, with that password)
# Existing files are kept, so running it again is safe; to rotate one, delete it and rerun.
# Usage: deploy/k8s/make-secrets.sh DIR [REDIS_URL]
set -eu
dir=${1:?usage: make-secrets.sh DIR [REDIS_URL]}
umask 077
mkdir -p "$dir"
make() {
  if [ -s "$dir/$1" ]; then
    echo "kept    $dir/$1"
  else
    # No trailing newline: the token is compared byte for byte.
    printf '%s' "$2" > "$dir/$1"
    echo "created $dir/$1"
  fi
}
random() {
  python3 -c "import base64, os, sys; print(getattr(base64, sys.argv[1])(os.urandom(32)).decode())" "$1"
}
token() {
  python3 -c "import secrets; print(secrets.token_hex(32))"
}
digest() {
  python3 -c "import hashlib, sys; print('sha256:' + hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())" "$dir/$1"
}
for kind in admin worker gateway; do
  make "$kind-token" "$(token)"
  make "registry-$kind-tokens" "$(digest "$kind-token")"
done
make worker-call-token "$(token)"
make worker-accepted-tokens "$(cat "$dir/worker-call-token")"
make encryption-key "$(random b64encode)"
[ -e "$dir/previous-encryption-key" ] || : > "$dir/previous-encryption-key"
make redis-password "$(python3 -c "import secrets; print(secrets.token_hex(24))")"
make redis-url "${2:-redis://:$(cat "$dir/redis-password")@fovea-redis:6379/0}"
