#!/usr/bin/env bash
# What each candidate adds to a cold build: a fresh crate depending on it alone, built with an
# empty target directory (dependencies already downloaded), dev and release, against an empty
# crate's build. Usage: bench/store/build_cost.sh [WORKDIR]
set -euo pipefail
work=${1:-$(mktemp -d)}
declare -A deps=(
  [none]=''
  [redb]='redb = "5"'
  [rusqlite]='rusqlite = { version = "0.43", features = ["bundled"] }'
  [fjall]='fjall = "3"'
)
printf '| crate | dev build (s) | release build (s) | crates compiled |\n|---|---:|---:|---:|\n'
for name in none redb rusqlite fjall; do
  d="$work/cost-$name"
  rm -rf "$d"; mkdir -p "$d/src"
  printf '[package]\nname = "cost-%s"\nversion = "0.1.0"\nedition = "2021"\n[workspace]\n[dependencies]\n%s\n' \
    "$name" "${deps[$name]}" > "$d/Cargo.toml"
  echo 'fn main() {}' > "$d/src/main.rs"
  (cd "$d" && cargo generate-lockfile -q && cargo fetch -q)
  row="| $name"
  for profile in dev release; do
    flag=""; [ "$profile" = release ] && flag="--release"
    rm -rf "$d/target"
    s=$(date +%s.%N)
    (cd "$d" && cargo build $flag 2> "$d/build.log")
    row="$row | $(echo "$(date +%s.%N) - $s" | bc | xargs printf '%.1f')"
  done
  n=$(grep -c '^ *Compiling' "$d/build.log")
  echo "$row | $((n - 1)) |"
  rm -rf "$d/target"
done
