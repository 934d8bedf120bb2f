#!/usr/bin/env bash
# GQN Mazes, as released with Clockwork VAE and used by FDM (mazes_cwvae): videos
# of 300 frames at 64x64. Writes
#   datasets/gqn_mazes-torch/{train,test}/<i>.npy   (uint8 [300 x 64 x 64 x 3])
# The converter checks free disk space once it knows the size of a video.
# Safe to re-run: finished steps are skipped and downloads resume.
#   usage: bash datasets/gqn_mazes/download.sh  (GQN_MAZES_URL=... to use a mirror)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

URL="${GQN_MAZES_URL:-https://archive.org/download/gqn_mazes/gqn_mazes.zip}"

download_mp4_zip gqn_mazes "$URL" "$DATASETS_DIR/gqn_mazes-torch"
