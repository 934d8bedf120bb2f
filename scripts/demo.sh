#!/usr/bin/env bash
# The README's demo: train a small flexible video model on bouncing_balls, sample a video
# 4x longer than its frame window, and write it as mp4/gif. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

export WANDB_MODE="${WANDB_MODE:-disabled}"
RUN_ID="${DEMO_RUN_ID:-demo}"
STEPS="${DEMO_STEPS:-2700}"
CKPT_DIR="checkpoints"
EVAL_DIR="results/demo/autoreg"
start=$(date +%s)

# A small model: 16x16 frames (shown 8x enlarged), an 8-frame window, attention at 8x8 and in
# the middle block. What made it learn coherent motion in ~10 CPU minutes (measured; see README):
# - v-prediction with the cosine schedule (epsilon + linear: errors amplified ~40x at high noise);
# - 8-frame training clips (--T 8), so every example shows frames as close as the sampler uses;
# - batch 8 at lr 1e-3 rather than batch 4 at 5e-4 (better per second of training);
# - --noise_mode mixed: some examples give each frame its own noise level.
MODEL_FLAGS=(--dataset bouncing_balls --image_size 16 --max_frames 8 --num_channels 32 --num_res_blocks 1
             --channel_mult 1,2,2 --attention_resolutions 8 --predict_v True --noise_schedule cosine)
TRAIN_FLAGS=(--T 8 --pad_with_random_frames False --batch_size 8 --lr 1e-3 --ema_rate 0.995
             --max_steps "$STEPS" --save_interval 500 --log_interval 100 --noise_mode mixed)

final=$(printf "%s/%s/ema_0.995_%06d.pt" "$CKPT_DIR" "$RUN_ID" "$STEPS")
if [ ! -f "$final" ]; then
  # --wandb_id starts the run under that id, or resumes it if an earlier demo was interrupted.
  python scripts/video_train.py "${MODEL_FLAGS[@]}" "${TRAIN_FLAGS[@]}" --checkpoint_dir "$CKPT_DIR" \
    --wandb_id "$RUN_ID"
fi
trained=$(date +%s)

# 32 frames = 4x the 8-frame window: 4 given frames, then 2 new frames per stage, each stage
# conditioned on the 6 frames before it.
python scripts/video_sample.py "$final" --sampling_scheme autoreg --n_obs 4 --T 32 \
  --max_latent_frames 2 --stop_index 2 --timestep_respacing 25 --use_ddim True --eval_dir "$EVAL_DIR"
python scripts/video_make_mp4.py --eval_dir "$EVAL_DIR" --scale 8
end=$(date +%s)

echo
echo "demo done in $((end - start)) s (training $((trained - start)) s)."
echo "videos: $EVAL_DIR/videos/ (left: sample, blue border = given frame, red = generated; right: ground truth)"
