#!/usr/bin/env bash
# The README's demo: train a small flexible video model on bouncing_balls, sample a video
# 4x longer than its frame window, and write it as mp4/gif. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

export WANDB_MODE="${WANDB_MODE:-disabled}"
RUN_ID="${DEMO_RUN_ID:-demo}"
STEPS="${DEMO_STEPS:-1500}"
CKPT_DIR="checkpoints"
EVAL_DIR="results/demo/autoreg"
start=$(date +%s)

# A small model: 32x32 frames, 8-frame window, attention at 8x8 and in the middle block.
# v-prediction with the cosine schedule learns far faster than epsilon with the linear one
# in a few minutes of training: epsilon errors are amplified ~40x at mid-high noise.
MODEL_FLAGS=(--dataset bouncing_balls --max_frames 8 --num_channels 32 --num_res_blocks 1
             --channel_mult 1,2,2 --attention_resolutions 8 --predict_v True --noise_schedule cosine)
# 32-frame training clips (not the dataset's 100) keep frames close in time, which is what
# the sampled video needs; without random padding frames every step trains on chosen frames.
TRAIN_FLAGS=(--T 32 --pad_with_random_frames False --batch_size 4 --lr 5e-4 --ema_rate 0.995
             --max_steps "$STEPS" --save_interval 500 --log_interval 50 --noise_mode fdm)

final=$(printf "%s/%s/ema_0.995_%06d.pt" "$CKPT_DIR" "$RUN_ID" "$STEPS")
if [ ! -f "$final" ]; then
  # --wandb_id starts the run under that id, or resumes it if an earlier demo was interrupted.
  python scripts/video_train.py "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" --checkpoint_dir "$CKPT_DIR" \
    --wandb_id "$RUN_ID"
fi
trained=$(date +%s)

# 32 frames = 4x the 8-frame window: 4 given frames, then 4 new frames per stage.
python scripts/video_sample.py "$final" --sampling_scheme autoreg --n_obs 4 --T 32 \
  --max_latent_frames 4 --stop_index 2 --timestep_respacing 50 --use_ddim True --eval_dir "$EVAL_DIR"
python scripts/video_make_mp4.py --eval_dir "$EVAL_DIR"
end=$(date +%s)

echo
echo "demo done in $((end - start)) s (training $((trained - start)) s)."
echo "videos: $EVAL_DIR/videos/ (left: sample, blue border = given frame, red = generated; right: ground truth)"
