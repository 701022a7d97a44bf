# fresh_dir DIR: empty DIR for a gpu/ script to fill, deleting only what a gpu/ script made there before (it leaves
# a marker file); a folder that holds anything else is refused, named, and left alone. Sourced by the gpu/ scripts.
GPU_DIR_MARKER=.made_by_nnunet_kd_gpu
fresh_dir() {
    local dir=$1
    if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ] && [ ! -e "$dir/$GPU_DIR_MARKER" ]; then
        echo "error: $dir is not empty and was not made by a gpu/ script: choose another folder or empty it" >&2
        return 1
    fi
    rm -rf "$dir" && mkdir -p "$dir" && : >"$dir/$GPU_DIR_MARKER"
}
