#!/bin/sh
# Entry point of the trilemma-moe image. A first argument that is a program on PATH (deepspeed,
# python, bash, ...) or a path runs as given, so launcher command lines read as they do outside the
# container; anything else goes to the `trilemma-moe` CLI (train, profile-comm, reshard, --help).
set -e
if [ "$#" -gt 0 ] && command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec trilemma-moe "$@"
