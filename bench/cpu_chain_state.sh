#!/usr/bin/env bash
# Carry a bench/cpu_chain.sh chain from one machine to the next when the disk does not persist
# (a chain needs more hours than a session has). `save` copies what the chain's --resume needs
# from its DIR to STATE, replacing what STATE held: stage a's state or its ViT
# (cache/stage_a_state.pt, or cache/vision.pt + stage_a.json once it ended), every step's
# directory (finished steps' models; the running step's train_state.pt) and the logs. The
# feature cache (gigabytes) is left out: the next call rebuilds it from the saved ViT, the same
# samples. `restore` copies STATE into a new DIR. From the repo root:
#   bash bench/cpu_chain_state.sh save DIR STATE
#   bash bench/cpu_chain_state.sh restore STATE DIR
set -euo pipefail
usage="usage: bash bench/cpu_chain_state.sh save DIR STATE | restore STATE DIR"
mode=${1:?$usage}
src=${2:?$usage}
dst=${3:?$usage}
[ -d "$src" ] || { echo "$src: no such directory" >&2; exit 2; }
# save empties STATE first: never when it is the chain itself
[ "$(realpath -m "$dst")" != "$(realpath "$src")" ] || { echo "$dst is $src" >&2; exit 2; }
case $mode in
  save)
    rm -rf "$dst"
    mkdir -p "$dst/cache"
    for f in stage_a_state.pt stage_a.json vision.pt; do
      if [ -f "$src/cache/$f" ]; then cp "$src/cache/$f" "$dst/cache/"; fi
    done
    for d in "$src"/s[0-9]; do
      if [ -d "$d" ]; then cp -r "$d" "$dst/"; fi
    done
    cp "$src"/s[0-9].log "$dst/" 2>/dev/null || true
    ;;
  restore)
    mkdir -p "$dst"
    cp -r "$src"/. "$dst"/
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
du -sh "$dst"
