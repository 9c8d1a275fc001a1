#!/usr/bin/env bash
# Downloads Fashion-MNIST's four IDX files from the dataset's official source
# (Zalando Research) into DIR (default: data/fashion-mnist), for machines
# without Debian's dataset-fashion-mnist package, and verifies them.
#
# The checksums are SHA-256 of the *decompressed* files, so they hold whatever
# gzip settings a mirror used; they were taken from Debian's package, which
# ships the same data. Usage: scripts/get_data.sh [DIR]   (--help: this text)
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
DIR=${1:-data/fashion-mnist}
BASE=${FXP_FASHION_MNIST_URL:-http://fashion-mnist.s3-website.eu-central-1.amazonaws.com}
declare -A SHA256=(
  [train-images-idx3-ubyte]=c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888
  [train-labels-idx1-ubyte]=bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9
  [t10k-images-idx3-ubyte]=5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b
  [t10k-labels-idx1-ubyte]=0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34
)
mkdir -p "$DIR"
for name in "${!SHA256[@]}"; do
  file=$DIR/$name.gz
  if [[ ! -s $file ]]; then
    echo "downloading $name.gz"
    curl -fL --retry 3 --progress-bar -o "$file.part" "$BASE/$name.gz" || { rm -f "$file.part"; echo "get_data.sh: download of $BASE/$name.gz failed" >&2; exit 1; }
    mv "$file.part" "$file"
  fi
  got=$(gzip -dc "$file" | sha256sum | cut -d' ' -f1) || { echo "get_data.sh: $file is not a valid gzip file; delete it and rerun" >&2; exit 1; }
  if [[ $got != "${SHA256[$name]}" ]]; then
    echo "get_data.sh: checksum mismatch for $file (got $got); delete it and rerun" >&2
    exit 1
  fi
  echo "ok  $file"
done
echo "Fashion-MNIST is in $DIR (pass it as the data directory)"
