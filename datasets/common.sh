# shellcheck shell=bash
# Shared helpers for the download scripts in datasets/*/download.sh (sourced, not run).
#
# Environment:
#   PYTHON        interpreter with numpy and imageio-ffmpeg (default: python3)
#   DATASETS_DIR  where converted datasets go (default: this folder); pass the same
#                 folder as data_root to get_dataset if you change it
#   KEEP_SOURCES  1 keeps the downloaded archive and extracted videos after conversion

PYTHON="${PYTHON:-python3}"
COMMON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$COMMON_DIR/.." && pwd)"
DATASETS_DIR="${DATASETS_DIR:-$COMMON_DIR}"
KEEP_SOURCES="${KEEP_SOURCES:-0}"

die() {
    echo "error: $*" >&2
    exit 1
}

need_command() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not installed."
}

need_downloader() {
    command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1 \
        || die "curl or wget is required to download datasets; install one of them."
}

need_python_modules() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "Python interpreter '$PYTHON' not found; set PYTHON=/path/to/python."
    local module
    for module in "$@"; do
        "$PYTHON" -c "import $module" >/dev/null 2>&1 \
            || die "Python module '$module' is missing for $PYTHON; run 'pip install -e .' in $REPO_DIR."
    done
}

need_ffmpeg() {
    # imageio-ffmpeg ships its own ffmpeg binary, so a system ffmpeg is not needed.
    "$PYTHON" -c "import imageio_ffmpeg; imageio_ffmpeg.get_ffmpeg_exe()" >/dev/null 2>&1 \
        || die "no ffmpeg available to decode mp4 files; run 'pip install imageio-ffmpeg'."
}

# Size in bytes of the file at a URL, or nothing if the server does not say (or
# cannot be reached: the download itself then reports the failure).
remote_size() {
    local headers
    if command -v curl >/dev/null 2>&1; then
        headers="$(curl -sIL --max-time 60 "$1" 2>/dev/null || true)"
    else
        headers="$(wget --spider --server-response --timeout=60 --tries=1 "$1" 2>&1 || true)"
    fi
    printf '%s\n' "$headers" | tr -d '\r' | awk 'tolower($1) == "content-length:" { n = $2 } END { print n }'
}

human() {
    if [ -z "$1" ]; then
        echo "unknown size"
    else
        awk -v b="$1" 'BEGIN { printf "%.1f GB", b / 1e9 }'
    fi
}

free_bytes() {
    mkdir -p "$1"
    df -Pk "$1" | awk 'NR == 2 { printf "%.0f\n", $4 * 1024 }'
}

# check_space DIR BYTES: stop early rather than fail halfway through unpacking.
check_space() {
    local free
    free="$(free_bytes "$1")"
    if [ -n "$2" ] && [ "$2" -gt "$free" ]; then
        die "$1 has $(human "$free") free but this needs about $(human "$2"); free some space or set DATASETS_DIR."
    fi
}

# fetch URL DEST: resumable download to DEST.part, renamed to DEST when complete.
fetch() {
    local url="$1" dest="$2" size="${3:-}"
    if [ -f "$dest" ]; then
        echo "Already downloaded: $dest"
        return
    fi
    local part="$dest.part"
    mkdir -p "$(dirname "$dest")"
    if [ -n "$size" ] && [ -f "$part" ] && [ "$(wc -c <"$part")" -eq "$size" ]; then
        mv "$part" "$dest"
        return
    fi
    echo "Downloading $url -> $dest"
    if command -v curl >/dev/null 2>&1; then
        curl -fL --retry 3 --retry-delay 5 -C - -o "$part" "$url" || die "download of $url failed (partial file kept at $part; re-run to resume)."
    else
        wget -c --tries=3 -O "$part" "$url" || die "download of $url failed (partial file kept at $part; re-run to resume)."
    fi
    mv "$part" "$dest"
}

# extract ARCHIVE DEST: unpack once (into DEST.part, renamed when complete).
extract() {
    local archive="$1" dest="$2"
    if [ -d "$dest" ]; then
        echo "Already extracted: $dest"
        return
    fi
    local part="$dest.part"
    rm -rf "$part"
    mkdir -p "$part"
    echo "Extracting $archive"
    case "$archive" in
        *.zip) "$PYTHON" -m zipfile -e "$archive" "$part" || die "could not unpack $archive (corrupt download? delete it and re-run)." ;;
        *.tar.gz | *.tgz) tar -xzf "$archive" -C "$part" || die "could not unpack $archive (corrupt download? delete it and re-run)." ;;
        *) die "do not know how to unpack $archive." ;;
    esac
    mv "$part" "$dest"
}

# download_mp4_zip NAME URL OUT NPY_BYTES: fetch a zip of {train,test}/*.mp4 (the
# Clockwork VAE releases FDM used) and convert it to OUT/{train,test}/<i>.npy.
download_mp4_zip() {
    local name="$1" url="$2" out="$3" npy_bytes="${4:-}"
    local work="$DATASETS_DIR/$name-download"
    local archive="$work/$name.zip"
    if [ -f "$out/.complete" ]; then
        echo "$out is complete; nothing to do."
        return
    fi
    need_downloader
    need_python_modules numpy imageio_ffmpeg tqdm
    need_ffmpeg
    mkdir -p "$work"

    local size=""
    [ -f "$archive" ] || size="$(remote_size "$url")"
    echo "Dataset:     $name"
    echo "Source:      $url ($(human "$size"))"
    echo "Destination: $out/{train,test}/<i>.npy (about $(human "$npy_bytes") once converted)"
    local needed=0
    [ -n "$size" ] && needed=$((2 * size))
    [ -n "$npy_bytes" ] && needed=$((needed + npy_bytes))
    check_space "$DATASETS_DIR" "$needed"

    fetch "$url" "$archive" "$size"
    extract "$archive" "$work/extracted"
    local train_dir
    train_dir="$(find "$work/extracted" -type d -name train | head -n 1)"
    [ -n "$train_dir" ] || die "no train/ folder found in $archive; the release layout has changed."
    local source_dir
    source_dir="$(dirname "$train_dir")"
    local split
    for split in train test; do
        [ -d "$source_dir/$split" ] || die "no $split/ folder found in $archive."
        "$PYTHON" "$COMMON_DIR/convert_mp4.py" "$source_dir/$split" "$out/$split" || die "conversion of $source_dir/$split failed."
    done
    touch "$out/.complete"
    if [ "$KEEP_SOURCES" != "1" ]; then
        rm -rf "$work"
        echo "Removed $work (set KEEP_SOURCES=1 to keep the archive)."
    fi
    echo "Done: $out"
}

# ---- TECO's releases (DMLab, Minecraft)
# Shared by datasets/dmlab/download.sh and datasets/minecraft/download.sh (sourced after
# ../common.sh, not run): TECO's releases are one tar split into parts, each part an item of
# the Internet Archive, https://archive.org/download/<item prefix><part>/<file prefix><part>
# (the items and files of TECO's scripts/download/{dmlab,minecraft}.sh and of Diffusion
# Forcing's datasets/video/{dmlab,minecraft}_video_dataset.py). The tar holds
# <name>/{train,test}/<dir>/<episode files>; they end up in $DATASETS_DIR/<name>/data/.

# download_teco_release NAME BASE_URL ITEM_PREFIX FILE_PREFIX ESTIMATED_BYTES PART...
# (ESTIMATED_BYTES: the whole release, for parts whose size the server does not tell)
download_teco_release() {
    local name="$1" base="$2" item_prefix="$3" file_prefix="$4" estimate="$5"
    shift 5
    local out="$DATASETS_DIR/$name/data"
    local work="$DATASETS_DIR/$name-download"
    if [ -f "$out/.complete" ]; then
        echo "$out is complete; nothing to do."
        return
    fi
    if [ ! -d "$out/train" ] || [ ! -d "$out/test" ]; then
        need_downloader
        need_command tar
        mkdir -p "$work"
        _teco_fetch_parts "$name" "$base" "$item_prefix" "$file_prefix" "$estimate" "$work" "$out" "$@"
        _teco_unpack "$name" "$file_prefix" "$work" "$out" "$@"
    fi
    touch "$out/.complete"
    if [ "$KEEP_SOURCES" != "1" ]; then
        rm -rf "$work"
        echo "Removed $work (set KEEP_SOURCES=1 to keep the parts)."
    fi
    echo "Done: $out"
}

# Download every part (resuming), after checking there is room for the parts and their contents.
_teco_fetch_parts() {
    local name="$1" base="$2" item_prefix="$3" file_prefix="$4" estimate="$5" work="$6" out="$7"
    shift 7
    local part size total=0 have=0 i=0
    local -a sizes=()
    for part in "$@"; do
        size=""
        if [ -f "$work/$file_prefix$part" ]; then
            have=$((have + $(wc -c <"$work/$file_prefix$part")))
            total=$((total + $(wc -c <"$work/$file_prefix$part")))
        else
            size="$(remote_size "$base/$item_prefix$part/$file_prefix$part")"
            total=$((total + ${size:-$((estimate / $#))}))
        fi
        sizes+=("$size")
    done
    echo "Dataset:     $name (TECO's release, $# parts)"
    echo "Source:      $base/$item_prefix<part>/$file_prefix<part>, parts $* ($(human "$total") in all)"
    echo "Destination: $out/{train,test} (about as large again once unpacked)"
    # The parts and the unpacked files are on disk together until unpacking ends.
    check_space "$DATASETS_DIR" $((2 * total - have))
    for part in "$@"; do
        fetch "$base/$item_prefix$part/$file_prefix$part" "$work/$file_prefix$part" "${sizes[$i]}"
        i=$((i + 1))
    done
}

# Unpack the concatenated parts (one tar) and move its train/ and test/ folders to $out.
_teco_unpack() {
    local name="$1" file_prefix="$2" work="$3" out="$4"
    shift 4
    local part split_dir source_dir split
    if [ ! -d "$work/extracted" ]; then
        rm -rf "$work/extracted.part"
        mkdir -p "$work/extracted.part"
        echo "Unpacking the $# parts (one tar)"
        for part in "$@"; do
            cat "$work/$file_prefix$part"
        done | tar -x -f - -C "$work/extracted.part" \
            || die "could not unpack the $name parts in $work (corrupt download? delete the bad part and re-run)."
        mv "$work/extracted.part" "$work/extracted"
    fi
    # The release's top folder (<name>/) holds train/ and test/; they are moved one by one, so a
    # re-run after an interruption finds the one left.
    split_dir="$(find "$work/extracted" -maxdepth 3 -type d \( -name train -o -name test \) -print -quit)"
    [ -n "$split_dir" ] || die "no train/ or test/ folder found in the $name release; its layout has changed."
    source_dir="$(dirname "$split_dir")"
    for split in train test; do
        [ -d "$out/$split" ] || [ -d "$source_dir/$split" ] || die "no $split/ folder found in the $name release."
    done
    mkdir -p "$out"
    for split in train test; do
        [ -d "$out/$split" ] || mv "$source_dir/$split" "$out/$split"
    done
}
