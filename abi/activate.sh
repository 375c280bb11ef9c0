#!/usr/bin/env bash
# Points DIR/lib<NAME>_latest.so at DIR/<LIB> atomically (symlink + rename): a
# reader sees the old or the new target, never a missing link. LIB stays in place
# (never overwrite or delete a library a host may still have loaded).
#   activate.sh DIR NAME LIB        e.g. activate.sh models mev libmev_v1a2b3c.so
set -euo pipefail
dir="${1:?usage: activate.sh DIR NAME LIB}"; name="${2:?}"; lib="${3:?}"
[[ "$lib" == */* ]] && { echo "activate.sh: LIB is a file name inside DIR" >&2; exit 2; }
[[ -f "$dir/$lib" ]] || { echo "activate.sh: $dir/$lib does not exist" >&2; exit 1; }
tmp="$dir/.lib${name}_latest.so.$$"
ln -s "$lib" "$tmp"
mv -T "$tmp" "$dir/lib${name}_latest.so"
