#!/usr/bin/env bash
# Downloads a dataset fxp-train reads from its official source, verifies it,
# and leaves the files in data/<dataset>, where fxp-train looks by default
# (for Fashion-MNIST it looks in /usr/share/datasets/fashion-mnist, Debian's
# package: pass --data-dir data/fashion-mnist to use a download instead).
#
# Usage: scripts/get_data.sh [DATASET] [DIR]    (--help: this text)
#   DATASET: fashion-mnist (default), mnist, emnist, cifar10, cifar100
#   DIR:     where the files go (default: data/DATASET); pass it to fxp-train
#            as --data-dir when it is not the default
# scripts/get_data.sh DIR (a directory, not a dataset name) gets Fashion-MNIST
# into DIR, as before.
#
# Checksums: Fashion-MNIST's are SHA-256 of the decompressed files (taken from
# Debian's dataset-fashion-mnist, so they hold whatever gzip settings a mirror
# used); the others are the MD5 sums their publishers list for the archives.
# A download resumes from a partial file; a file with a wrong checksum is an
# error (delete it and rerun). Needs curl, and python3 for EMNIST's zip.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; fi

DATASETS="fashion-mnist mnist emnist cifar10 cifar100"
if [[ $# -ge 1 && " $DATASETS " == *" $1 "* ]]; then
  DATASET=$1; DIR=${2:-data/$1}
elif [[ $# -ge 1 && -n $1 && $1 != -* && ( $1 == */* || -d $1 ) ]]; then
  # A directory named after another dataset (data/cifar10, cifar10x/) would get Fashion-MNIST under that name.
  for other in cifar100 cifar10 emnist mnist; do  # cifar100 before its prefix cifar10
    if [[ $(basename "$1") == "$other"* ]]; then
      echo "get_data.sh: '$1' is a directory, which gets Fashion-MNIST; for $other run:" \
           "scripts/get_data.sh $other $1 (Fashion-MNIST there: scripts/get_data.sh fashion-mnist $1)" >&2
      exit 2
    fi
  done
  DATASET=fashion-mnist; DIR=$1
elif [[ $# -ge 1 ]]; then
  echo "get_data.sh: unknown dataset '$1' (one of: $DATASETS)" >&2; exit 2
else
  DATASET=fashion-mnist; DIR=data/fashion-mnist
fi
mkdir -p "$DIR"

fail() { echo "get_data.sh: $*" >&2; exit 1; }

# download URL FILE: into FILE, resuming a partial FILE.part.
download() {
  [[ -s $2 ]] && return 0
  echo "downloading $1"
  curl -fL --retry 3 -C - --progress-bar -o "$2.part" "$1" || fail "download of $1 failed (rerun to resume)"
  mv "$2.part" "$2"
}

check_md5() {
  local got; got=$(md5sum "$1" | cut -d' ' -f1)
  [[ $got == "$2" ]] || fail "checksum mismatch for $1 (MD5 $got, expected $2); delete it and rerun"
  echo "ok  $1"
}

case $DATASET in
  fashion-mnist)
    BASE=${FXP_FASHION_MNIST_URL:-http://fashion-mnist.s3-website.eu-central-1.amazonaws.com}
    declare -A SHA256=(
      [train-images-idx3-ubyte]=c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888
      [train-labels-idx1-ubyte]=bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9
      [t10k-images-idx3-ubyte]=5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b
      [t10k-labels-idx1-ubyte]=0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34
    )
    for name in "${!SHA256[@]}"; do
      file=$DIR/$name.gz
      download "$BASE/$name.gz" "$file"
      got=$(gzip -dc "$file" | sha256sum | cut -d' ' -f1) || fail "$file is not a valid gzip file; delete it and rerun"
      [[ $got == "${SHA256[$name]}" ]] || fail "checksum mismatch for $file (got $got); delete it and rerun"
      echo "ok  $file"
    done
    ;;
  mnist)
    BASE=${FXP_MNIST_URL:-https://ossci-datasets.s3.amazonaws.com/mnist}
    declare -A MD5=(
      [train-images-idx3-ubyte.gz]=f68b3c2dcbeaaa9fbdd348bbdeb94873
      [train-labels-idx1-ubyte.gz]=d53e105ee54ea40749a09fcbcd1e9432
      [t10k-images-idx3-ubyte.gz]=9fb629c4189551a2d022fa330f9573f3
      [t10k-labels-idx1-ubyte.gz]=ec29112dd5afa0611ce80d1b7f02629c
    )
    for name in "${!MD5[@]}"; do
      download "$BASE/$name" "$DIR/$name"
      check_md5 "$DIR/$name" "${MD5[$name]}"
    done
    ;;
  emnist)
    # One 536 MB zip of every EMNIST split; fxp uses the balanced one (47 classes).
    zip=$DIR/emnist-gzip.zip
    download "${FXP_EMNIST_URL:-https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip}" "$zip"
    check_md5 "$zip" 58c8d27c78d21e728a6bc7b3cc06412e
    python3 - "$zip" "$DIR" <<'EOF' || fail "cannot unpack $zip"
import pathlib, sys, zipfile
archive, out = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(archive) as z:
    for member in z.namelist():
        name = pathlib.PurePosixPath(member).name
        if name.startswith("emnist-balanced-") and name.endswith("-ubyte.gz"):
            (out / name).write_bytes(z.read(member))
            print("ok ", out / name)
EOF
    ;;
  cifar10 | cifar100)
    if [[ $DATASET == cifar10 ]]; then
      archive=cifar-10-binary.tar.gz; md5=c32a1d4ab5d03f1284b67883e8d87530
    else
      archive=cifar-100-binary.tar.gz; md5=03b5dce01913d631647c71ecec9e9cb8
    fi
    download "${FXP_CIFAR_URL:-https://www.cs.toronto.edu/~kriz}/$archive" "$DIR/$archive"
    check_md5 "$DIR/$archive" "$md5"
    tar -xzf "$DIR/$archive" -C "$DIR" || fail "cannot unpack $DIR/$archive"
    ;;
esac
echo "$DATASET is in $DIR (fxp-train --dataset $DATASET --data-dir $DIR)"
