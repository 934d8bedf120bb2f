#!/usr/bin/env bash
# Minecraft, as released with TECO (Yan et al. 2023) and used by Diffusion Forcing: 200k
# episodes of 300 frames at 128x128 with the agent's discrete actions (about 210 GB, TECO's
# README). Writes
#   datasets/minecraft/data/{train,test}/<dir>/<i>.mp4   the frames
#   datasets/minecraft/data/{train,test}/<dir>/<i>.npz   actions int [one per frame]
# The release is one tar in 11 parts, items minecraft_marsh_dataset_{aa..ak} of the Internet
# Archive. Needs twice the dataset's size free while unpacking. Safe to re-run: finished
# parts are skipped and downloads resume.
#   usage: bash datasets/minecraft/download.sh      (MINECRAFT_URL_BASE=... to use a mirror)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

BASE="${MINECRAFT_URL_BASE:-https://archive.org/download}"

download_teco_release minecraft "$BASE" minecraft_marsh_dataset_ minecraft.tar.part 210000000000 \
    aa ab ac ad ae af ag ah ai aj ak
