#!/usr/bin/env bash
# DMLab, as released with TECO (Yan et al. 2023) and used by Diffusion Forcing: 40k episodes
# of 300 frames at 64x64 with the agent's discrete actions (about 54 GB, TECO's README). Writes
#   datasets/dmlab/data/{train,test}/<dir>/<i>.npz   (video uint8 [300 x 64 x 64 x 3], actions int [300])
# The release is one tar in 3 parts, items dmlab_dataset_{aa,ab,ac} of the Internet Archive.
# Needs twice the dataset's size free while unpacking. Safe to re-run: finished parts are
# skipped and downloads resume.
#   usage: bash datasets/dmlab/download.sh      (DMLAB_URL_BASE=... to use a mirror)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

BASE="${DMLAB_URL_BASE:-https://archive.org/download}"

download_teco_release dmlab "$BASE" dmlab_dataset_ dmlab.tar.part 54000000000 aa ab ac
