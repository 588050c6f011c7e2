#!/bin/bash
# Run TRL's six VLM example scripts on vlmalign with only their `from trl ...` import lines changed.
#   bash benchmarks/run_trl_example_scripts.sh WORKDIR TRL_EXAMPLES_DIR
# TRL_EXAMPLES_DIR holds TRL 1.16's examples/scripts/*.py (from a huggingface/trl checkout; not shipped here).
# Prints one line per script: name, exit code, seconds. Logs: WORKDIR/logs_<name>.txt.
set -u
W=$(realpath -m "$1"); SRC=$2; REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$REPO HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$W/scripts" && cd "$W" || exit 1
for f in sft_vlm sft_vlm_gemma3 dpo_vlm mpo_vlm grpo_vlm gspo_vlm; do
  sed -e 's/^from trl\.rewards import/from vlmalign.rewards import/' -e 's/^from trl import/from vlmalign import/' \
    "$SRC/$f.py" > "scripts/$f.py"
done
python "$REPO/benchmarks/trl_scripts_data.py" "$W" > /dev/null 2>&1 || { echo "data preparation failed"; exit 1; }
M=$W/models; D=$W/data; O=$W/out
run() { name=$1; log=$2; shift 2; start=$(date +%s); python "scripts/$name.py" "$@" > "logs_$log.txt" 2>&1; echo "$log rc=$? $(( $(date +%s) - start ))s"; }
run sft_vlm sft_vlm --dataset_name $D/sft --model_name_or_path $M/llava_clip --output_dir $O/sft --max_steps 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --logging_steps 1
run sft_vlm_gemma3 sft_vlm_gemma3 --dataset_name $D/sft --model_name_or_path $M/gemma3 --per_device_train_batch_size 1 --output_dir $O/gemma --dtype float32 --use_peft --lora_target_modules all-linear --attn_implementation eager --max_steps 2 --logging_steps 1
run dpo_vlm dpo_vlm --dataset_name $D/dpo --model_name_or_path $M/idefics3 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --dataset_num_proc 1 --output_dir $O/dpo --dtype float32 --use_peft --lora_target_modules all-linear --max_steps 2 --logging_steps 1
run dpo_vlm dpo_vlm_streaming --dataset_name $D/dpo --dataset_streaming --model_name_or_path $M/idefics3 --per_device_train_batch_size 2 --max_steps 2 --gradient_accumulation_steps 2 --dataset_num_proc 1 --output_dir $O/dpo_stream --dtype float32 --use_peft --lora_target_modules all-linear --logging_steps 1
run mpo_vlm mpo_vlm --dataset_name $D/dpo --model_name_or_path $M/idefics3 --per_device_train_batch_size 2 --per_device_eval_batch_size 2 --num_train_epochs 1 --max_steps 2 --gradient_accumulation_steps 2 --dataset_num_proc 1 --output_dir $O/mpo --dtype float32 --use_peft --lora_target_modules down_proj, o_proj, k_proj, q_proj, gate_proj, up_proj, v_proj --loss_type sigmoid bco_pair sft --loss_weights 0.8 0.2 1.0 --logging_steps 1
# grpo/gspo hard-code load_dataset("lmms-lab/multimodal-open-r1-8k-verified"): the data script writes that folder in WORKDIR
run grpo_vlm grpo_vlm --model_name_or_path $M/qwen2_5_vl --output_dir $O/grpo --learning_rate 1e-5 --dtype float32 --max_completion_length 8 --use_peft --lora_target_modules "q_proj", "v_proj" --log_completions --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --num_generations 2 --max_steps 2 --logging_steps 1
run gspo_vlm gspo_vlm --model_name_or_path $M/qwen2_5_vl --output_dir $O/gspo --learning_rate 1e-5 --dtype float32 --max_completion_length 8 --use_peft --lora_target_modules "q_proj", "v_proj" --log_completions --per_device_train_batch_size 4 --num_generations 4 --importance_sampling_level sequence --epsilon 3e-4 --epsilon_high 4e-4 --beta 0.0 --loss_type grpo --gradient_accumulation_steps 2 --steps_per_generation 4 --max_steps 2 --logging_steps 1
