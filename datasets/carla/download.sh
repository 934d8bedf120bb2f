#!/usr/bin/env bash
# CARLA Town01 without traffic, FDM's release: videos of 1000 frames at 128x128
# stored as uint8 tensors [1000 x 128 x 128 x 3]. Writes
#   datasets/carla/no-traffic/video_<i>.pt (+ coords_<i>.npy)
#   datasets/carla/no-traffic/video_{train,test}.csv   (the last 100 videos are the test set)
# Safe to re-run: finished steps are skipped and the download resumes.
#   usage: bash datasets/carla/download.sh      (CARLA_URL=... to use a mirror)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

URL="${CARLA_URL:-https://www.cs.ubc.ca/~wsgh/fdm/carla/no-traffic.tar.gz}"
OUT="$DATASETS_DIR/carla/no-traffic"
WORK="$DATASETS_DIR/carla/download"
ARCHIVE="$WORK/no-traffic.tar.gz"

if [ -f "$OUT/.complete" ]; then
    echo "$OUT is complete; nothing to do."
    exit 0
fi
need_downloader
need_command tar
need_python_modules numpy torch

SIZE=""
[ -f "$ARCHIVE" ] || SIZE="$(remote_size "$URL")"
echo "Dataset:     CARLA Town01, no traffic"
echo "Source:      $URL ($(human "$SIZE"))"
echo "Destination: $OUT (each video is 1000 x 128 x 128 x 3 bytes, 49 MB, once unpacked)"
# The unpacked videos are larger than the gzip archive; 4x is a generous estimate.
[ -z "$SIZE" ] || check_space "$DATASETS_DIR" $((4 * SIZE))

fetch "$URL" "$ARCHIVE" "$SIZE"
if [ ! -d "$OUT" ]; then
    extract "$ARCHIVE" "$WORK/extracted"
    SOURCE="$(dirname "$(find "$WORK/extracted" -name 'video_*.pt' | head -n 1)")"
    [ "$SOURCE" != "." ] || die "no video_<i>.pt files found in $ARCHIVE; the release layout has changed."
    mv "$SOURCE" "$OUT"
fi
if [ ! -f "$OUT/video_train.csv" ] || [ ! -f "$OUT/video_test.csv" ]; then
    echo "Writing the train/test split files"
    PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
        "import sys; from improved_diffusion.data.splits import write_carla_split; write_carla_split(sys.argv[1])" \
        "$OUT" || die "could not write the split files in $OUT."
fi
touch "$OUT/.complete"
if [ "$KEEP_SOURCES" != "1" ]; then
    rm -rf "$WORK"
    echo "Removed $WORK (set KEEP_SOURCES=1 to keep the archive)."
fi
echo "Done: $OUT"
