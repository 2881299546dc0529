#!/usr/bin/env sh
# Create the files the gpu-prod overlay turns into the fovea-secrets Secret:
#   internal-token  shared secret of registry, workers and gateways (random, 32 bytes)
#   accepted-internal-token  a second token the services accept, set only while rotating (empty)
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
make internal-token "$(random urlsafe_b64encode)"
[ -e "$dir/accepted-internal-token" ] || : > "$dir/accepted-internal-token"
make encryption-key "$(random b64encode)"
[ -e "$dir/previous-encryption-key" ] || : > "$dir/previous-encryption-key"
make redis-password "$(python3 -c "import secrets; print(secrets.token_hex(24))")"
make redis-url "${2:-redis://:$(cat "$dir/redis-password")@fovea-redis:6379/0}"
