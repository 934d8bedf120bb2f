#!/usr/bin/env bash
# MineRL Navigate, as released with Clockwork VAE and used by FDM: 961 training and
# 225 test videos of 500 frames at 64x64. Writes
#   datasets/minerl_navigate-torch/{train,test}/<i>.npy   (uint8 [500 x 64 x 64 x 3])
# Safe to re-run: finished steps are skipped and downloads resume.
#   usage: bash datasets/minerl/download.sh     (MINERL_URL=... to use a mirror)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

URL="${MINERL_URL:-https://archive.org/download/minerl_navigate/minerl_navigate.zip}"
NPY_BYTES=$(((961 + 225) * 500 * 64 * 64 * 3))

download_mp4_zip minerl_navigate "$URL" "$DATASETS_DIR/minerl_navigate-torch" "$NPY_BYTES"
